"""One torch thread against two for a node's calls, by the call's size (rows x the range's weights), in one
process: a range's forward without gradients (a generation step) and with its backward (a training call).

    python bench/call_thread_sizes.py --preset llama-1m --blocks 0 1
    python bench/call_thread_sizes.py --preset llama-small --blocks 0 4
    python bench/call_thread_sizes.py --model-path models/smollm2-135m-instruct --blocks 0 10

Prints, per shape, the call's multiply-adds (swarm.call_threads.call_multiply_adds) and the best-of-rounds
milliseconds on one and on two threads, alternating. Why: swarm.call_threads runs a call below a size on one
thread; this is the in-process side of where that bound goes (in one process a second thread never loses; with
several node processes on the same cores a short call's second thread does, see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from swarm import process_env  # noqa: E402

process_env.prepare()  # before torch loads libgomp: the OpenMP settings a node computes under

import torch  # noqa: E402

from swarm.call_threads import call_multiply_adds  # noqa: E402
from swarm.config import LoraSpec  # noqa: E402
from swarm.lora import add_lora  # noqa: E402
from swarm.models.blocks import BlockStack  # noqa: E402
from swarm.models.checkpoint import Checkpoint  # noqa: E402
from swarm.models.presets import materialize_preset  # noqa: E402

GENERATION_SHAPES = [(8, 1), (32, 1), (64, 1), (128, 1), (8, 16), (8, 44)]
TRAINING_SHAPES = [(4, 16), (8, 16), (8, 44), (16, 44), (32, 80)]


def call_seconds(stack: BlockStack, batch: int, positions: int, train: bool, repeats: int) -> float:
    """Median seconds of the range over a batch x positions input (after one warm-up call)."""
    hidden = torch.randn(batch, positions, stack.config.hidden_size)
    mask = torch.ones(batch, positions, dtype=torch.long)
    position_ids = torch.arange(positions).expand(batch, positions)
    seconds = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        if train:
            leaf = hidden.clone().requires_grad_(True)
            output = stack(leaf, mask, position_ids)
            output.backward(torch.ones_like(output))
        else:
            with torch.no_grad():
                stack(hidden, mask, position_ids)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="llama-1m")
    source.add_argument("--model-path", type=Path)
    parser.add_argument("--blocks", type=int, nargs=2, default=[0, 2], metavar=("START", "END"))
    parser.add_argument("--rounds", type=int, default=2, help="alternations of one and two threads")
    args = parser.parse_args()

    checkpoint = Checkpoint.open(args.model_path or materialize_preset(args.preset, 0))
    stack = BlockStack(checkpoint, *args.blocks, torch.float32, torch.device("cpu"))
    add_lora(stack, LoraSpec(r=8, alpha=16), 0)
    name = args.model_path.name if args.model_path else args.preset
    print(f"{name}, blocks {args.blocks[0]}-{args.blocks[1]} ({stack.weight_count:,} weights)")
    print("| call | batch x positions | multiply-adds | 1 thread, ms | 2 threads, ms | 2 / 1 |")
    print("|---|---|---:|---:|---:|---:|")
    for train, shapes in ((False, GENERATION_SHAPES), (True, TRAINING_SHAPES)):
        for batch, positions in shapes:
            best = {}
            for _ in range(args.rounds):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    seconds = call_seconds(stack, batch, positions, train, 5 if train else 20)
                    best[threads] = min(best.get(threads, seconds), seconds)
            work = call_multiply_adds(torch.empty(batch, positions, 0), stack.weight_count)
            print(f"| {'forward + backward' if train else 'forward, no gradients'} | {batch} x {positions} "
                  f"| {work / 1e6:,.1f}M | {best[1] * 1e3:.2f} | {best[2] * 1e3:.2f} | {best[2] / best[1]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
