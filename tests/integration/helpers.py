"""Running the real CLIs in tests: wait for a line, collect output, fail with the process's own words."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


class CliProcess:
    """A started CLI whose output a thread collects line by line (pipes and select don't mix with buffering)."""

    def __init__(self, popen, output: Path | None = None):
        """`popen`: a subprocess.Popen whose stdout is a pipe, or a node forked by the node fork server
        (coordinator.node_forks.ForkedNode: the same pid, poll, wait, send_signal and kill) writing to the FIFO
        `output`."""
        self.popen = popen
        self.pid = popen.pid
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self._output = output
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # opening the FIFO blocks until the node has opened its end
        stream = open(self._output, errors="replace") if self._output else self.popen.stdout
        for line in stream:
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


JOIN_LINE = r"join with: swarm-node join (--coordinator \S+ --coordinator-key [0-9a-f]{32})"


def join_flags(coordinator: CliProcess, timeout: float = 60) -> list[str]:
    """The flags of the join command `swarm-coordinator run` printed: its address and the key to pin."""
    match, _ = read_until(coordinator, JOIN_LINE, timeout)
    return match.group(1).split()


# A `swarm-node` that has done its imports (seconds of a loaded machine) and waits for its arguments on stdin.
_WARM_NODE = (
    "import json, sys\n"
    "import node.cli, node.join  # noqa: F401  the heavy imports, before the arguments are known\n"
    "print('warm', flush=True)\n"
    "node.cli.main(json.loads(sys.stdin.readline()))\n"
)


def start_warm_node(start) -> tuple[CliProcess, object]:
    """A node process started ahead of time; call the returned `join(args)` to make it run `swarm-node
    join ARGS` at once. A test that needs a node to arrive while a job runs cannot depend on how long an
    interpreter takes to import torch, transformers and hivemind."""
    process = start("-c", _WARM_NODE, stdin=subprocess.PIPE)
    read_until(process, r"^warm$", timeout=180)

    def join(args: list[str]) -> None:
        process.popen.stdin.write(json.dumps(["join", *args]) + "\n")
        process.popen.stdin.flush()

    return process, join


def finish(process: CliProcess, timeout: float) -> tuple[int, str]:
    """Wait for the process to exit; return its code and all of its output."""
    try:
        code = process.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait()
        raise AssertionError(f"process did not exit within {timeout} s; output:\n{''.join(process.seen)}") from None
    process._reader.join(timeout=10)
    while True:
        try:
            line = process.lines.get_nowait()
        except queue.Empty:
            break
        if line is not None:
            process.seen.append(line)
    return code, "".join(process.seen)


class Watcher:
    """Follows the coordinator's output: which node was given which range, and which nodes are in the chain
    (the first chain's, then each one that joined it as a replica)."""

    def __init__(self, process):
        self.process = process
        self.ranges: dict[str, str] = {}  # node id -> "a..b"
        self.serving: set[str] = set()
        self.started = threading.Event()
        self.done = threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._follow, daemon=True).start()

    def shared_ranges(self, gone: list[str], timeout: float = 60.0) -> list[str]:
        """Nodes in the chain whose range has another one there (never the last replica of a range: losing that
        rolls every range back, which test_takeover covers), waiting for the spare to join the chain if no range
        has two."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.done.is_set():
            alive = {node: self.ranges[node] for node in list(self.serving) if node not in gone}
            shared = sorted(node for node, blocks in alive.items() if list(alive.values()).count(blocks) >= 2)
            if shared:
                return shared
            time.sleep(0.1)
        raise AssertionError("no range with two live replicas (or the job ended first):\n" + "".join(self.lines))

    def _follow(self) -> None:
        while True:
            try:
                line = self.process.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                self.done.set()
                return
            self.lines.append(line)
            assigned = re.search(r"assigned blocks (\S+) to node (\w+)", line)
            if assigned:
                self.ranges[assigned.group(2)] = assigned.group(1)
            joined = re.search(r"node (\w+) (joined|took over) blocks \S+", line)
            if joined:
                self.serving.add(joined.group(1))
            if "chain: " in line:
                self.serving |= set(re.findall(r"node (\w+) \(blocks", line))
                self.started.set()


def assert_undisturbed(job, run_dir, tolerance: float) -> None:
    """The run's losses and final adapter are those an undisturbed single machine gets (swarm.reference)."""
    import torch

    from coordinator.run_dir import read_metrics
    from swarm.lora import load_peft_adapter
    from swarm.models.checkpoint import resolve_model
    from swarm.reference import train_reference

    reference = train_reference(resolve_model(job.model), job)
    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert len(losses) == len(reference.losses)
    assert max(abs(a - b) for a, b in zip(losses, reference.losses)) <= 1e-4
    _, adapter = load_peft_adapter(run_dir / "adapter")
    assert adapter.keys() == reference.adapter.keys()
    worst = max((adapter[name] - reference.adapter[name]).abs().max().item() for name in adapter)
    assert worst <= tolerance, worst
    assert any(not torch.equal(adapter[name], torch.zeros_like(adapter[name])) for name in adapter)


def swarm_audit(*args) -> subprocess.CompletedProcess:
    """`swarm-audit ARGS...` as a user runs it."""
    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "swarm.audit.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def start_swarm(start, job_file, run_dir, keys_dir, nodes: int) -> tuple[Watcher, dict[str, CliProcess]]:
    """`swarm-coordinator run` and `nodes` separate `swarm-node join` processes (to be killed by PID), started
    with `start` (tests.conftest.started_processes); returns once the chain trains: the coordinator's watcher
    and the nodes by node id."""
    coordinator = start("-m", "coordinator.cli", "run", str(job_file), "--run-dir", str(run_dir),
                        "--no-progress", "--no-baseline")
    flags = join_flags(coordinator)
    started = {}
    for index in range(nodes):
        node = start("-m", "node.cli", "join", *flags, "--key", str(keys_dir / f"node{index}.key"), "--threads", "1")
        identity, _ = read_until(node, r"node identity (\w+)", timeout=60)
        started[identity.group(1)] = node
    watcher = Watcher(coordinator)
    assert watcher.started.wait(180), "".join(watcher.lines)
    return watcher, started


@contextlib.contextmanager
def local_session(job_file, run_dir, nodes: int):
    """An in-process coordinator session whose chain is served by `nodes` real local node processes."""
    from coordinator.prepared_job import RunOptions, prepare_job
    from coordinator.session import SwarmSession
    from coordinator.run_dir import create_run_dir

    options = RunOptions(job_file=job_file, run_dir=run_dir, local_nodes=nodes, node_threads=1, progress=False)
    prepared = prepare_job(options)
    create_run_dir(options.runs_root, prepared.job.name, job_file, options.run_dir)
    with SwarmSession(prepared, run_dir, options) as session:
        session.gather()
        yield prepared, session
