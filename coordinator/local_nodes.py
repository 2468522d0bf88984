"""`--local-nodes N`: start N swarm-node processes on 127.0.0.1 and stop them when the job ends.

The CLI starts them warm (`prewarm`, before its own heavy imports): each runs `node.warm_start`, importing
what a node needs while the coordinator starts, and becomes `swarm-node join ...` when LocalNodes hands it its
arguments. A warm process that died, or none left (a sweep's later runs), gives a freshly started node.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("swarm.coordinator")

_WARM: list[subprocess.Popen] = []  # started by prewarm, taken by the next LocalNodes


def prewarm(count: int) -> None:
    """Start `count` node processes that import now and take their `swarm-node` arguments later."""
    for _ in range(count):
        _WARM.append(subprocess.Popen([sys.executable, "-m", "node.warm_start"], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))


def discard_warm() -> None:
    """Kill the warm processes no run took (the job failed before its nodes started): a few seconds of imports
    each, not to be left competing for the cores."""
    while _WARM:
        process = _WARM.pop()
        process.kill()
        process.wait()


def _start_node(argv: list[str], log_path: Path) -> subprocess.Popen:
    """A warm process given `argv`, or a new `swarm-node` process when no warm one is left alive."""
    while _WARM:
        process = _WARM.pop(0)
        try:
            process.stdin.write((json.dumps({"argv": argv, "log": str(log_path)}) + "\n").encode())
            process.stdin.close()
            return process
        except (OSError, ValueError):  # it died warming up (a broken pipe): the next one, or a fresh start
            process.wait()
    with open(log_path, "ab") as log:  # appended, not truncated: a resumed run keeps the crashed run's node logs
        return subprocess.Popen([sys.executable, "-m", "node.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


class LocalNodes:
    def __init__(self, count: int, join_flags: list[str], run_dir: Path, cache_dir: Path | None,
                 threads: int | None = None):
        """`join_flags`: the coordinator's address and key pin, as SwarmSession.join_flags gives them: local
        nodes authenticate the coordinator exactly as any other node does."""
        self.logs_dir = run_dir / "nodes"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        # N nodes share this machine's cores; more torch threads than cores only adds contention.
        threads = threads or max(1, (os.cpu_count() or 1) // count)
        for index in range(count):
            argv = ["join", *join_flags, "--key", str(self.logs_dir / f"node-{index}.key"), "--device", "cpu"]
            if cache_dir is not None:
                argv += ["--cache-dir", str(cache_dir)]
            argv += ["--threads", str(threads)]
            self.processes.append(_start_node(argv, self.logs_dir / f"node-{index}.log"))
        logger.info("started %d local nodes (logs in %s)", count, self.logs_dir)

    @property
    def count(self) -> int:
        return len(self.processes)

    def exited(self) -> list[tuple[int, int]]:
        """(index, exit code) of local nodes that have already stopped."""
        return [(i, p.returncode) for i, p in enumerate(self.processes) if p.poll() is not None]

    def log_tail(self, index: int, lines: int = 15) -> str:
        text = (self.logs_dir / f"node-{index}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0, grace: float = 10.0) -> None:
        """Give nodes that were told the job ended `grace` seconds to exit, then SIGTERM (a node leaves
        cleanly), then SIGKILL whatever is still running, by process group."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(0.1)
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("local node %d did not stop; killing it", process.pid)
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # also hivemind's helper processes in the node's group
            except ProcessLookupError:
                pass
            process.wait()
