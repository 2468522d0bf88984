"""The single-process baseline of a run: a few plain-peft steps of the same model and batch, timed: LoRA steps,
and for a job with a `pretrain` phase also full-parameter steps (as nodes pretrain: the zero adapter skipped).

The report compares what the swarm spent with what one machine would have spent on the same run. That figure
is measured here, on this machine, right after the run (its nodes stopped, so they do not compete for the
cores): `swarm.reference.train_reference` trains the whole model in one process with the job's batch and
micro-batches. It runs in a child process so its peak memory is the baseline's alone, not the coordinator's.
The figure is the median of the timed steps' seconds per token: a one-off stall in one of a few timed steps
(seen: 3.1 s against 0.11-0.15 s on the first step after the warm-up, on an AMX Xeon) would otherwise
decide it, while over a whole run such a stall is amortised.

    python -m coordinator.baseline JOB_FILE CHECKPOINT_DIR OUT.json [--steps 10 --warmup 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

from swarm import allocator, process_env

logger = logging.getLogger("swarm.coordinator")

BASELINE_TIMEOUT_S = 600.0
MEMORY_HEADROOM = 3  # skip when weights x this exceed the free memory: weights, activations, logits and slack
# Timed steps per kind. Three moved the report's ratio by 15% between two runs of one job on one machine
# (170 s against 203 s of one-machine time); a step of a small model is a tenth of a second.
TIMED_STEPS = 10
WARMUP_STEPS = 2


def measure_baseline(job_file: Path, checkpoint_dir: Path, out: Path, steps: int = TIMED_STEPS,
                     warmup: int = WARMUP_STEPS) -> dict:
    """Write `out` (baseline.json) and return it; a baseline that cannot run here is recorded as skipped."""
    weights = sum(path.stat().st_size for path in Path(checkpoint_dir).glob("*.safetensors"))
    available = psutil.virtual_memory().available
    if weights * MEMORY_HEADROOM > available:
        result = {"skipped": f"the whole model ({weights / 2**30:.1f} GiB of weights) does not fit in this machine's "
                             f"free memory ({available / 2**30:.1f} GiB)"}
    else:
        paths = (str(Path(path).resolve()) for path in (job_file, checkpoint_dir, out))
        command = [sys.executable, "-m", "coordinator.baseline", *paths, "--steps", str(steps), "--warmup", str(warmup)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BASELINE_TIMEOUT_S,
                                  cwd=Path(__file__).resolve().parent.parent,
                                  env=allocator.child_env(process_env.alone()))  # the nodes' allocator
        except subprocess.TimeoutExpired:
            done = None
        if done is not None and done.returncode == 0:
            return json.loads(out.read_text())
        tail = "timed out" if done is None else (done.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"skipped": f"the single-process run failed ({tail})"}
    logger.warning("single-process baseline: %s", result["skipped"])
    out.write_text(json.dumps(result, indent=2))
    return result


def _per_token(seconds: list[float], tokens: list[int]) -> float:
    return statistics.median(t / n for t, n in zip(seconds, tokens))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_file", type=Path)
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=TIMED_STEPS)
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS)
    args = parser.parse_args()

    import peft  # noqa: F401  imported before measuring, so the memory growth below is the model, not code
    import torch
    import transformers  # noqa: F401

    from swarm.config import load_job
    from swarm.data.batches import TrainingData
    from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
    from swarm.data.tokenizer import load_tokenizer
    from swarm.memory import rss_bytes
    from swarm.reference import train_reference

    job = load_job(args.job_file)
    total = args.warmup + args.steps
    records = None
    if job.data.responses == "self":  # the base model's answers the run trained on, saved beside OUT.json
        records = read_self_responses(args.out.parent / SELF_RESPONSES_FILE, job.data.source)
    rss_before = rss_bytes()
    run = train_reference(args.checkpoint_dir, job, steps=total, records=records)
    phase = job.phase_list[0]
    data = TrainingData(job.data, load_tokenizer(args.checkpoint_dir, job.data.chat_format), job.seed,
                        phase.batch_size, records=records)
    tokens = [data.batch(step).tokens for step in range(total)]  # the batches train_reference trained on
    timed = run.step_seconds[args.warmup:]
    result = {
        "how": "swarm.reference.train_reference: plain peft LoRA on the whole model in one process",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "steps_timed": len(timed),
        "step_seconds": timed, "tokens": tokens[args.warmup:],
        "seconds_per_token": _per_token(timed, tokens[args.warmup:]),
        "rss_before_load": rss_before,
    }
    if any(phase.kind == "pretrain" for phase in job.phase_list):
        # Timed, not scaled by FLOPs: on a small model a full step can cost less than a LoRA one (measured on
        # llama-1m, batch 32: 0.107 s against 0.127 s), as it skips the adapter's many small matmuls.
        full = train_reference(args.checkpoint_dir, job, steps=total, records=records, full=True)
        result["pretrain_step_seconds"] = full.step_seconds[args.warmup:]
        result["pretrain_seconds_per_token"] = _per_token(full.step_seconds[args.warmup:], tokens[args.warmup:])
    result["peak_rss_bytes"] = _peak_rss()
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
