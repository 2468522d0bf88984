"""Writing a frame in two writes (swarm.p2p.framing.send_frame) vs hivemind's writer, on the direct data channel.

    python bench/framing.py --rounds 6 --calls 60

An echo of the main job's pretrain hidden states (0.79 MB each way) over a node's direct data channel, in this
process (bench/echo.py), alternating rounds in which both ends write their frames with `send_frame` and with
hivemind's `P2P.send_protobuf` (the same bytes, its body handed to the transport in 64 KiB pieces: each its own
TLS write and `send` syscall). Prints each round's median round trip and the ratio of the medians.

Why: every forward and backward call of a small model's step moves a batch of hidden states each way; on a
2-core machine the syscalls and TLS records of those pieces are part of every call's time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from swarm import allocator, process_env  # noqa: E402

allocator.restart_under_allocator("bench/framing.py", (__file__,), process_env.alone())  # as the CLI, under tcmalloc
process_env.prepare()

from hivemind.p2p import P2P  # noqa: E402

import node.channel_server  # noqa: E402
import swarm.p2p.direct  # noqa: E402
from bench.echo import HIDDEN_ELEMENTS, channel_round_trips, tensor_label  # noqa: E402
from swarm.p2p.framing import send_frame  # noqa: E402

WRITERS = {"send_frame": send_frame, "hivemind": P2P.send_protobuf}


def use(writer) -> None:
    """Both ends of the channel (the trainer's requests, the node's replies) write frames with `writer`."""
    swarm.p2p.direct.send_frame = writer
    node.channel_server.send_frame = writer


async def rounds(count: int, calls: int) -> dict[str, list[float]]:
    medians = {name: [] for name in WRITERS}
    for _ in range(count):
        for name, writer in WRITERS.items():
            use(writer)
            trips = await channel_round_trips(HIDDEN_ELEMENTS, calls)
            medians[name].append(trips[tensor_label(HIDDEN_ELEMENTS)])
    use(send_frame)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=60, help="round trips per round (the first 5 are warm-up)")
    args = parser.parse_args()
    if args.rounds < 1 or args.calls <= 5:
        parser.error("--rounds must be at least 1 and --calls over 5 (the first 5 calls of a round are warm-up)")
    medians = asyncio.run(rounds(args.rounds, args.calls))
    print(f"direct data channel echo, {tensor_label(HIDDEN_ELEMENTS)} each way, {args.rounds} rounds x {args.calls} "
          f"calls, malloc: {allocator.current_allocator()}")
    print("| round | " + " | ".join(f"{name}, ms" for name in WRITERS) + " |")
    print("|---:|" + "---:|" * len(WRITERS))
    for index in range(args.rounds):
        print(f"| {index + 1} | " + " | ".join(f"{medians[name][index]:.2f}" for name in WRITERS) + " |")
    ours, theirs = (statistics.median(medians[name]) for name in WRITERS)
    print(f"median over rounds: send_frame {ours:.2f} ms, hivemind's writer {theirs:.2f} ms, ratio {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
