"""A node's own cost per training call, in one process: forward, backward and the audited step of a Shard in a
pretrain phase, with the all-zero adapter skipped (what nodes do) vs computed, and the gradient sketch with its
bucket hashes kept between steps (what nodes do) vs hashed anew. Side by side in one run; ratios, not seconds.

    python bench/node_step.py --preset llama-1m --blocks 0 2 --batch-size 32 --length 80 --steps 15

Why: on a tiny model a swarm step is the nodes' compute plus round trips, and both cuts measured here come out
of every pretraining step (the README's main job pretrains 1,200 of them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.shard import Shard  # noqa: E402
from swarm.audit import sketch  # noqa: E402
from swarm.config import LoraSpec, OptimizerSpec  # noqa: E402
from swarm.lora import compute_lora  # noqa: E402
from swarm.models.checkpoint import Checkpoint  # noqa: E402
from swarm.models.presets import materialize_preset  # noqa: E402


def call_times(shard: Shard, inputs, grad, first_step: int, steps: int) -> dict[str, float]:
    """Median seconds of forward, backward and step over `steps` steps (after one warm-up)."""
    times: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for step in range(first_step, first_step + steps + 1):
        started = time.perf_counter()
        shard.forward(step, 0, True, *inputs)
        forwarded = time.perf_counter()
        shard.backward(step, 0, grad, None)
        backwarded = time.perf_counter()
        shard.apply_step(step, 1e-4)
        if step > first_step:
            times["forward"].append(forwarded - started)
            times["backward"].append(backwarded - forwarded)
            times["step"].append(time.perf_counter() - backwarded)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-1m")
    parser.add_argument("--blocks", type=int, nargs=2, default=[0, 2], metavar=("START", "END"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=80)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two setups")
    args = parser.parse_args()

    checkpoint = Checkpoint.open(materialize_preset(args.preset, 0))
    shard = Shard(checkpoint, *args.blocks, LoraSpec(r=8, alpha=16), OptimizerSpec(lr=1e-4), 0, torch.float32,
                  torch.device("cpu"))
    shard.configure_phase("pretrain", "pretrain", "continue", "bench")
    generator = torch.Generator().manual_seed(0)
    size = (args.batch_size, args.length, checkpoint.config.hidden_size)
    inputs = [torch.randn(size, generator=generator), torch.ones(size[:2], dtype=torch.long),
              torch.arange(args.length).expand(size[:2]).contiguous()]
    grad = torch.randn(size, generator=generator) * 1e-3
    kept_hashes = sketch._HASHES
    results: dict[str, list[dict[str, float]]] = {"nodes now": [], "adapter computed, hashes anew": []}
    step = 0
    for _ in range(args.rounds):
        for setup in results:
            now = setup == "nodes now"
            compute_lora(shard.blocks, enabled=not now)
            for name, param in shard.blocks.named_parameters():  # the adapter stays frozen, as in pretrain
                if ".lora_" in name:
                    param.requires_grad_(False)
            sketch._HASHES = kept_hashes if now else sketch._HashCache(0)
            results[setup].append(call_times(shard, inputs, grad, step, args.steps))
            step += args.steps + 1
    sketch._HASHES = kept_hashes
    print(f"{args.preset}, blocks {args.blocks[0]}..{args.blocks[1] - 1}, batch {args.batch_size} x {args.length}, "
          f"pretrain phase, {args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} torch threads")
    print("| call | nodes now, ms | adapter computed + hashes anew, ms | ratio |")
    print("|---|---|---|---|")
    for call in ("forward", "backward", "step"):
        now = statistics.median(r[call] for r in results["nodes now"]) * 1e3
        before = statistics.median(r[call] for r in results["adapter computed, hashes anew"]) * 1e3
        print(f"| {call} | {now:.1f} | {before:.1f} | {now / before:.2f} |")


if __name__ == "__main__":
    main()
