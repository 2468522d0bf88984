"""`--local-nodes N`: start N swarm-node processes on 127.0.0.1 and stop them when the job ends."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("swarm.coordinator")


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
            command = [sys.executable, "-m", "node.cli", "join", *join_flags,
                       "--key", str(self.logs_dir / f"node-{index}.key"), "--device", "cpu"]
            if cache_dir is not None:
                command += ["--cache-dir", str(cache_dir)]
            command += ["--threads", str(threads)]
            # Appended, not truncated: a resumed run keeps the crashed run's node logs.
            log = open(self.logs_dir / f"node-{index}.log", "ab")
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            log.close()
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
