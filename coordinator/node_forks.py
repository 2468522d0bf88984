"""The coordinator's side of node.fork_server: ask it for node processes and follow them as subprocess would.

A forked node is the server's child, not ours, so its exit code comes from the server's messages; `ForkedNode`
gives it the part of subprocess.Popen's interface that LocalNodes uses (pid, poll, wait, send_signal,
returncode). Should the server die before a node it forked, the node's exit code is lost with it: the node is
then followed by its pid alone, and reported with LOST_EXIT_CODE once gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from swarm import allocator

logger = logging.getLogger("swarm.coordinator")

LOST_EXIT_CODE = -1000  # no signal or exit status is this: the server that knew the code died first
ORDER_TIMEOUT_S = 600.0  # the server answers an order once its imports are done: seconds, minutes on a loaded machine


class NodeForkServer:
    """A running `python -m node.fork_server`, its imports under way from the moment it is constructed."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "node.fork_server"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                        env=allocator.child_env(os.environ))  # its nodes' allocator
        self._changed = threading.Condition()
        self._forked: list[int] = []  # pids acknowledged and not yet taken by fork()
        self._exits: dict[int, int] = {}
        self._gone = False  # its stdout ended: it exited or was killed
        self._order_lock = threading.Lock()
        threading.Thread(target=self._follow, name="node-fork-server", daemon=True).start()

    def fork(self, argv: list[str], log_path: Path) -> ForkedNode | None:
        """A node running `swarm-node ARGV` with its output appended to `log_path`, from our working directory
        and with our environment; None when the server is gone or does not answer (the caller starts a fresh
        process instead)."""
        with self._order_lock:
            try:
                order = {"argv": argv, "log": str(log_path), "cwd": os.getcwd(), "env": dict(os.environ)}
                self.process.stdin.write((json.dumps(order) + "\n").encode())
                self.process.stdin.flush()
            except (OSError, ValueError):  # it died (a broken pipe) or was closed
                return None
            with self._changed:
                if not self._changed.wait_for(lambda: self._forked or self._gone, timeout=ORDER_TIMEOUT_S):
                    logger.warning("the node fork server did not answer in %.0f s; stopping it", ORDER_TIMEOUT_S)
                    self.close()
                    return None
                if not self._forked:
                    return None
                return ForkedNode(self._forked.pop(0), self)

    def alive(self) -> bool:
        return self.process.poll() is None and not self._gone

    def close(self) -> None:
        """Stop the server (its forked nodes go on: their owner stops them)."""
        try:
            self.process.kill()
        except ProcessLookupError:
            pass
        self.process.wait()
        if self.process.stdin:
            self.process.stdin.close()

    def exit_code(self, pid: int) -> int | None:
        """The exit code of forked node `pid`: None while it runs; LOST_EXIT_CODE once gone if the server died."""
        with self._changed:
            if pid in self._exits:
                return self._exits[pid]
            if not self._gone:
                return None
        return None if _running(pid) else LOST_EXIT_CODE

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.exit_code(pid)
            remaining = None if deadline is None else deadline - time.monotonic()
            if code is not None or (remaining is not None and remaining <= 0):
                return code
            with self._changed:
                self._changed.wait(0.1 if remaining is None else min(0.1, remaining))

    def _follow(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self._changed:
                if "exit" in message:
                    self._exits[message["pid"]] = message["exit"]
                elif "pid" in message:
                    self._forked.append(message["pid"])
                self._changed.notify_all()
        with self._changed:
            self._gone = True
            self._changed.notify_all()


def _running(pid: int) -> bool:
    """Whether `pid` runs: an orphan's zombie counts as gone (a container's init may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: whether a signal could reach it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


class ForkedNode:
    """A node the fork server started, followed like a subprocess.Popen."""

    def __init__(self, pid: int, server: NodeForkServer):
        self.pid = pid
        self.returncode: int | None = None
        self._server = server

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.wait_exit(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"node {self.pid}", timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it ended since: the server's report is on its way
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
