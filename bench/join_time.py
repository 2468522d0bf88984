"""How long a node takes to join: from starting `swarm-node join` to serving its blocks, found in the DHT.

    python bench/join_time.py --preset llama-micro --repeats 5

Each repetition starts a fresh coordinator session (DHT and gRPC service, in this process) for a one-node
job, then starts one `swarm-node join` process and records, from the moment it was started:
registered (authenticated over gRPC, the coordinator knows it), ready (assigned, blocks loaded, its DHT node
up and the blocks announced), and discovered (the trainer found the node's announcements in the DHT and
built its chain). Prints every repetition and the medians. Times include the node process's own start-up
(Python, torch and hivemind imports), which is what a volunteer waits for; the `imports` column is the time a fresh
interpreter takes to `import node.join` (measured right before, inside that interpreter): the floor under
those figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.prepared_job import RunOptions, prepare_job  # noqa: E402
from coordinator.session import SwarmSession  # noqa: E402
from coordinator.run_dir import create_run_dir  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.node_state import NodeState  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def import_seconds() -> float:
    """A fresh interpreter importing the node's code (torch, transformers' model code, hivemind), timed inside
    the child so that interpreter start-up and tear-down are left out."""
    code = "import time; started = time.perf_counter(); import node.join; print(time.perf_counter() - started)"
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def one_join(job_file: Path, run_dir: Path, threads: int) -> dict[str, float]:
    options = RunOptions(job_file=job_file, run_dir=run_dir, progress=False)
    prepared = prepare_job(options)
    create_run_dir(options.runs_root, prepared.job.name, job_file, run_dir)
    times: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the session prints its address for humans
        session = SwarmSession(prepared, run_dir, options).start()
    node = None
    try:
        gathered = threading.Event()
        thread = threading.Thread(target=lambda: (session.gather(), gathered.set()), daemon=True)
        thread.start()
        log = open(run_dir / "node.log", "wb")
        started = time.perf_counter()
        node = subprocess.Popen([sys.executable, "-m", "node.cli", "join", *session.join_flags,
                                 "--key", str(run_dir / "node.key"), "--device", "cpu", "--threads", str(threads)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        log.close()
        while not gathered.is_set():
            records = session.membership.nodes()
            if records and "registered" not in times:
                times["registered"] = time.perf_counter() - started
            if records and records[0].state is NodeState.READY and "ready" not in times:
                times["ready"] = time.perf_counter() - started
            if node.poll() is not None or time.perf_counter() - started > 120:
                raise SystemExit(f"the node did not join; its log:\n{(run_dir / 'node.log').read_text()[-2000:]}")
            time.sleep(0.01)
        times["discovered"] = time.perf_counter() - started
        thread.join(timeout=5)
    finally:
        session.close("benchmark repetition done")
        if node is not None:
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, 9)
                node.wait()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-micro")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the node")
    args = parser.parse_args()
    setup_logging("WARNING", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-join-time-"))
    job_file = work / "job.yaml"
    job_file.write_text(yaml.safe_dump({"name": "bench-join", "model": {"preset": args.preset},
                                        "training": {"steps": 1}, "swarm": {"min_nodes": 1}}))
    stages = ("imports", "registered", "ready", "discovered")
    results = []
    print(f"model {args.preset}, one node joining a fresh coordinator, {args.repeats} repetitions; "
          "seconds since `swarm-node join` started")
    print(f"{'repetition':<12}" + "".join(f"{stage:>12}" for stage in stages))
    for repeat in range(args.repeats):
        imports = import_seconds()
        times = {"imports": imports, **one_join(job_file, work / f"run-{repeat}", args.threads)}
        results.append(times)
        print(f"{repeat + 1:<12}" + "".join(f"{times[stage]:>12.2f}" for stage in stages), flush=True)
    print(f"{'median':<12}" + "".join(f"{statistics.median(r[s] for r in results):>12.2f}" for s in stages))


if __name__ == "__main__":
    main()
