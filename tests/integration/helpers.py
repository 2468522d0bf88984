"""Running the real CLIs in tests: wait for a line, collect output, fail with the process's own words."""

from __future__ import annotations

import re
import select
import subprocess
import time


def read_until(process: subprocess.Popen, pattern: str, timeout: float) -> tuple[re.Match, str]:
    """Read the process's output until a line matches `pattern`; return the match and everything read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if not ready:
            if process.poll() is not None:
                break
            continue
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match, "".join(seen)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{''.join(seen)}")


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for the process to exit; return its code and remaining output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"process did not exit within {timeout} s; output:\n{output}")
    return process.returncode, output
