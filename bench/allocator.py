"""glibc's malloc against tcmalloc for node processes, without the swarm around them: three Shards of llama-1m's
blocks (the main job's ranges) in three processes, driven in turn over pipes through pretrain or LoRA steps, and
the same three Shards in one process for reference. Side by side in one run, rounds alternating.

    python bench/allocator.py --steps 30 --rounds 2
    python bench/allocator.py --steps 30 --rounds 2 --kind lora

Prints, per setup, the median of each step's forward, backward and step seconds (summed over the ranges, timed
inside each process) and of the whole step as the driver saw it. Why: in the swarm a node's calls took longer
than the same calls of the same Shard in one process; this says how much of that is the allocator
(swarm/allocator.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from swarm import allocator, process_env  # noqa: E402

RANGES = [(0, 2), (2, 3), (3, 4)]
BATCH, LENGTH = 32, 53  # the main job's pretrain batches: 32 rows padded to 51-53 positions


def make_shards(ranges, kind: str):
    import torch

    from node.shard import Shard
    from swarm.config import LoraSpec, OptimizerSpec
    from swarm.models.checkpoint import Checkpoint
    from swarm.models.presets import materialize_preset

    checkpoint = Checkpoint.open(materialize_preset("llama-1m", 0))
    shards = [Shard(checkpoint, start, end, LoraSpec(r=8, alpha=16), OptimizerSpec(lr=1e-4), 0, torch.float32,
                    torch.device("cpu")) for start, end in ranges]
    for shard in shards:
        shard.configure_phase("bench", kind if kind == "pretrain" else "sft", "continue", "bench")
    return shards


def call(shard, method: str, step: int, tensors):
    from swarm.call_threads import one_thread

    if method == "forward":
        return shard.forward(step, 0, True, *tensors, input_grad=True)
    if method == "backward":
        return shard.backward(step, 0, tensors[0], None)
    with one_thread():  # as nodes step (swarm.call_threads)
        shard.apply_step(step, 1e-4)
    return None


def serve(connection, start: int, end: int, kind: str, threads: int) -> None:
    """One node-like process: its Shard answers (method, step, tensors) with (output, seconds inside)."""
    process_env.prepare()
    import torch

    torch.set_num_threads(threads)
    shard = make_shards([(start, end)], kind)[0]
    connection.send(allocator.current_allocator())
    while (order := connection.recv()) is not None:
        started = time.perf_counter()
        output = call(shard, *order)
        connection.send((output, time.perf_counter() - started))


def one_step(step: int, stages, torch) -> dict[str, float]:
    """`stages`: per range, a function (method, step, tensors) -> (output, seconds inside)."""
    seconds = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    started = time.perf_counter()
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    positions = torch.arange(LENGTH).expand(BATCH, LENGTH)
    hidden = torch.randn(BATCH, LENGTH, 128)
    for stage in stages:
        hidden, inside = stage("forward", step, (hidden, mask, positions))
        seconds["forward"] += inside
    grad = torch.randn(BATCH, LENGTH, 128) * 1e-3
    for stage in reversed(stages):
        grad, inside = stage("backward", step, (grad,))
        seconds["backward"] += inside
    for stage in stages:
        seconds["step"] += stage("step", step, ())[1]
    seconds["whole"] = time.perf_counter() - started
    return seconds


def processes_round(kind: str, steps: int, threads: int, preload: str | None) -> tuple[str, list[dict]]:
    import torch

    env_before = os.environ.get(allocator.PRELOAD)
    if preload:
        os.environ[allocator.PRELOAD] = preload  # spawned interpreters start under it
    else:
        os.environ.pop(allocator.PRELOAD, None)
    context = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    try:
        for start, end in RANGES:
            ours, theirs = context.Pipe()
            worker = context.Process(target=serve, args=(theirs, start, end, kind, threads), daemon=True)
            worker.start()
            pipes.append(ours)
            workers.append(worker)
        names = {pipe.recv() for pipe in pipes}
    finally:
        if env_before is None:
            os.environ.pop(allocator.PRELOAD, None)
        else:
            os.environ[allocator.PRELOAD] = env_before

    def stage(pipe):
        def run(method, step, tensors):
            pipe.send((method, step, tensors))
            return pipe.recv()
        return run

    try:
        rows = [one_step(step, [stage(pipe) for pipe in pipes], torch) for step in range(steps + 3)][3:]
    finally:
        for pipe in pipes:
            pipe.send(None)
        for worker in workers:
            worker.join(timeout=30)
    return ", ".join(sorted(names)), rows


def in_process_round(shards, steps: int, first: int) -> list[dict]:
    import torch

    def stage(shard):
        def run(method, step, tensors):
            started = time.perf_counter()
            output = call(shard, method, step, tensors)
            return output, time.perf_counter() - started
        return run

    return [one_step(first + step, [stage(shard) for shard in shards], torch) for step in range(steps + 3)][3:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the setups")
    parser.add_argument("--kind", choices=["pretrain", "lora"], default="pretrain")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    args = parser.parse_args()
    tcmalloc = allocator.find_tcmalloc()
    if tcmalloc is None:
        sys.exit("bench/allocator.py: tcmalloc is not installed (Debian: apt-get install libtcmalloc-minimal4)")
    process_env.prepare()
    import torch

    torch.set_num_threads(args.threads)
    shards = make_shards(RANGES, args.kind)
    results: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for preload in (None, str(tcmalloc)):
            name, rows = processes_round(args.kind, args.steps, args.threads, preload)
            results.setdefault(f"3 processes, {name}", []).extend(rows)
        results.setdefault(f"1 process, {allocator.current_allocator()}", []).extend(
            in_process_round(shards, args.steps, 1000 * (round_index + 1)))
    print(f"llama-1m ranges {RANGES}, batch {BATCH} x {LENGTH}, {args.kind} steps, {args.threads} torch threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| setup | forward, ms | backward, ms | step, ms | whole step, ms |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        medians = [statistics.median(row[part] for row in rows) * 1e3 for part in ("forward", "backward", "step", "whole")]
        print(f"| {name} | " + " | ".join(f"{value:.1f}" for value in medians) + " |")


if __name__ == "__main__":
    main()
