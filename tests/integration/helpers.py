"""Running the real CLIs in tests: wait for a line, collect output, fail with the process's own words."""

from __future__ import annotations

import contextlib
import queue
import re
import subprocess
import threading
import time


class CliProcess:
    """A started CLI whose output a thread collects line by line (pipes and select don't mix with buffering)."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def poll(self):
        return self.popen.poll()


def read_until(process: CliProcess, pattern: str, timeout: float) -> tuple[re.Match, str]:
    """Read the process's output until a line matches `pattern`; return the match and the lines read so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = process.lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            process.lines.put(None)
            break
        process.seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match, "".join(process.seen)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{''.join(process.seen)}")


def finish(process: CliProcess, timeout: float) -> tuple[int, str]:
    """Wait for the process to exit; return its code and all of its output."""
    try:
        code = process.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait()
        raise AssertionError(f"process did not exit within {timeout} s; output:\n{''.join(process.seen)}")
    process._reader.join(timeout=10)
    while True:
        try:
            line = process.lines.get_nowait()
        except queue.Empty:
            break
        if line is not None:
            process.seen.append(line)
    return code, "".join(process.seen)


@contextlib.contextmanager
def local_session(job_file, run_dir, nodes: int):
    """An in-process coordinator session whose chain is served by `nodes` real local node processes."""
    from coordinator.job_runner import RunOptions, SwarmSession, prepare_job
    from coordinator.run_dir import create_run_dir

    options = RunOptions(job_file=job_file, run_dir=run_dir, local_nodes=nodes, node_threads=1, progress=False)
    prepared = prepare_job(options)
    create_run_dir(options.runs_root, prepared.job.name, job_file, options.run_dir)
    with SwarmSession(prepared, run_dir, options) as session:
        session.gather()
        yield prepared, session
