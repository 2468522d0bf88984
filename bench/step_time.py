"""Swarm step time vs single-process step time, same model, data and batch, measured side by side.

    python bench/step_time.py --preset llama-small --nodes 2 --batch-size 8 --seq 128 --steps 10

Starts N local nodes, times `--steps` swarm training steps after `--warmup`, then the same steps in one
process with plain peft, and prints both and their ratio. Run on an otherwise idle machine; numbers from
one run are comparable with each other only.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.job_runner import RunOptions, SwarmSession, prepare_job  # noqa: E402
from coordinator.run_dir import create_run_dir  # noqa: E402
from coordinator.trainer import train_step  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.reference import train_reference  # noqa: E402


def write_long_examples(path: Path, seq: int, count: int = 256) -> None:
    """Prompt/response pairs that tokenize (one id per character) to exactly `seq` tokens."""
    rng = random.Random(0)
    overhead = len("User: \nAssistant: ") + 2  # bos and eos
    with path.open("w") as handle:
        for _ in range(count):
            prompt = "".join(rng.choices(string.ascii_lowercase, k=(seq - overhead) // 2))
            response = "".join(rng.choices(string.ascii_lowercase, k=seq - overhead - len(prompt)))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    setup_logging("WARNING", "bench")
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-step-time-"))
    write_long_examples(work / "data.jsonl", args.seq)
    total = args.warmup + args.steps
    job = {
        "name": "bench-step-time", "model": {"preset": args.preset},
        "data": {"source": "jsonl", "path": str(work / "data.jsonl"), "max_length": args.seq},
        "training": {"steps": total, "batch_size": args.batch_size},
        "swarm": {"min_nodes": args.nodes},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    options = RunOptions(job_file=work / "job.yaml", run_dir=work / "run", local_nodes=args.nodes,
                         node_threads=threads, progress=False)
    prepared = prepare_job(options)
    run_dir = create_run_dir(options.runs_root, prepared.job.name, options.job_file, options.run_dir)
    swarm_seconds = []
    with SwarmSession(prepared, run_dir, options) as session:
        chain = session.gather()
        for step in range(total):
            started = time.perf_counter()
            train_step(chain, session.head, prepared.data.batch(step), step, prepared.job.optimizer.lr,
                       prepared.job.training.micro_batches)
            if step >= args.warmup:
                swarm_seconds.append(time.perf_counter() - started)
    reference = train_reference(prepared.checkpoint.path, prepared.job, steps=total)
    local_seconds = reference.step_seconds[args.warmup:]
    swarm_median, local_median = statistics.median(swarm_seconds), statistics.median(local_seconds)
    print(f"model {args.preset}, {args.nodes} nodes, batch {args.batch_size} x {args.seq} tokens, "
          f"{args.steps} timed steps, {threads} torch threads")
    print(f"{'setup':<16}{'median step s':>15}{'ratio':>8}")
    print(f"{'single process':<16}{local_median:>15.4f}{1.0:>8.2f}")
    print(f"{'swarm':<16}{swarm_median:>15.4f}{swarm_median / local_median:>8.2f}")


if __name__ == "__main__":
    main()
