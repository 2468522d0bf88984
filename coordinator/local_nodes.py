"""`--local-nodes N`: start N swarm-node processes on 127.0.0.1 and stop them when the job ends.

The CLI starts a node fork server (`prewarm`, before its own heavy imports): one process that imports what a
node needs while the coordinator starts, and forks a node per LocalNodes order, a sweep's later runs included
(coordinator.node_forks, node.fork_server). Should it be gone, nodes start as fresh `swarm-node` processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from coordinator.node_forks import ForkedNode, NodeForkServer
from swarm import allocator

logger = logging.getLogger("swarm.coordinator")

_SERVER: list[NodeForkServer] = []  # the one fork server of this process, started by prewarm or the first node


def prewarm(count: int) -> None:
    """Start the node fork server now (when `count` nodes will be needed), so its imports run beside ours."""
    if count:
        fork_server()


def stop_fork_server() -> None:
    """Stop the fork server (nodes it forked are their LocalNodes' to stop): its imports are seconds of CPU
    not to be left competing for the cores when the job failed before any node started."""
    while _SERVER:
        _SERVER.pop().close()


def fork_server() -> NodeForkServer:
    """This process's node fork server, started (or restarted, if it died) now when there is none."""
    if _SERVER and not _SERVER[0].alive():
        stop_fork_server()
    if not _SERVER:
        _SERVER.append(NodeForkServer())
    return _SERVER[0]


def _start_node(argv: list[str], log_path: Path, fork: bool = True) -> subprocess.Popen | ForkedNode:
    """A node forked by the fork server (started now if there is none), or a fresh `swarm-node` process when
    asked for one or when the server cannot fork it."""
    if fork:
        forked = fork_server().fork(argv, log_path)
        if forked is not None:
            return forked
        stop_fork_server()
    with open(log_path, "ab") as log:  # appended, not truncated: a resumed run keeps the crashed run's node logs
        return subprocess.Popen([sys.executable, "-m", "node.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=allocator.child_env(os.environ))


def node_threads(count: int, micro_batches: int, cpus: int | None = None) -> int:
    """Torch threads for each of `count` local nodes sharing `cpus` cores (os.cpu_count() by default).

    With one micro-batch a step, one node computes at a time (the batch goes through the ranges in turn), so
    each node may use every core: the others wait for their turn with their threads asleep (OpenMP's passive
    wait policy, swarm.process_env). On 2 cores, 3 nodes of llama-1m at batch 32 took 0.88x the pretrain
    step with 2 threads each instead of 1 (bench/node_threads.py). With several micro-batches in flight
    (pipelined, or over replica lanes) up to `count` nodes compute at once: they share the cores, as more
    threads than cores only adds contention."""
    cpus = cpus or os.cpu_count() or 1
    return cpus if micro_batches == 1 else max(1, cpus // count)


class LocalNodes:
    def __init__(self, count: int, join_flags: list[str], run_dir: Path, cache_dir: Path | None,
                 threads: int | None = None, fork: bool = True, micro_batches: int = 1):
        """`join_flags`: the coordinator's address and key pin, as SwarmSession.join_flags gives them: local
        nodes authenticate the coordinator exactly as any other node does. `fork=False` starts each as a fresh
        process, as a volunteer's node is: a forked node shares the pages of the libraries the server loaded,
        and counts in its resident set only those it touches itself, so its memory figures are not a
        volunteer's. `micro_batches`: the job's, which sets the nodes' torch threads unless `threads` does
        (node_threads)."""
        self.logs_dir = run_dir / "nodes"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen | ForkedNode] = []
        threads = threads or node_threads(count, micro_batches)
        for index in range(count):
            argv = ["join", *join_flags, "--key", str(self.logs_dir / f"node-{index}.key"), "--device", "cpu"]
            if cache_dir is not None:
                argv += ["--cache-dir", str(cache_dir)]
            argv += ["--threads", str(threads)]
            self.processes.append(_start_node(argv, self.logs_dir / f"node-{index}.log", fork))
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
