"""Chaos: nodes SIGKILLed at random moments while a replicated job trains, then one stopped with Ctrl-C. The
job completes, every step is applied once, a spare takes the place of the first node killed (copying a
surviving replica), the stopped node hands its range over at a step boundary, and the final adapter is the
one an undisturbed single machine trains."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import threading
import time

import pytest
import torch

from coordinator.run_dir import read_metrics
from swarm.audit import AuditLog
from swarm.config import load_job
from swarm.lora import load_peft_adapter
from swarm.models.checkpoint import resolve_model
from swarm.reference import train_reference
from tests.conftest import started_processes, write_job
from tests.integration.helpers import finish, read_until

STEPS, NODES, KILLS = 70, 5, 2  # 2 ranges x 2 replicas and one spare
LR = 0.002  # where this tiny model's training is not chaotic itself (see test_replicas.JOIN_LR)
ADAPTER_TOLERANCE = 1e-4


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
        """Nodes in the chain whose range has another one there (never the last replica of a range: losing it
        is the job's end, not chaos), waiting for the spare to join the chain if no range has two."""
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
            joined = re.search(r"node (\w+) joined blocks \S+ as a replica", line)
            if joined:
                self.serving.add(joined.group(1))
            if "chain: " in line:
                self.serving |= set(re.findall(r"node (\w+) \(blocks", line))
                self.started.set()


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    job_file = write_job(tmp, training={"steps": STEPS, "batch_size": 8, "micro_batches": 4}, optimizer={"lr": LR},
                         swarm={"min_nodes": 4, "replicas": 2, "heartbeat_interval_s": 0.5, "rpc_timeout_s": 30})
    rng = random.Random(os.getpid())
    killed = []
    with started_processes() as start:
        coordinator = start("-m", "coordinator.cli", "run", str(job_file), "--run-dir", str(tmp / "run"),
                            "--no-progress", "--no-baseline")
        match, _ = read_until(coordinator, r"join with: swarm-node join --coordinator (\S+)", timeout=60)
        nodes = {}
        for index in range(NODES):
            node = start("-m", "node.cli", "join", "--coordinator", match.group(1), "--key",
                         str(tmp / f"node{index}.key"), "--threads", "1")
            identity, _ = read_until(node, r"node identity (\w+)", timeout=60)
            nodes[identity.group(1)] = node
        watcher = Watcher(coordinator)
        assert watcher.started.wait(180), "".join(watcher.lines)
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 3.0))
            victim = rng.choice(watcher.shared_ranges(killed))
            nodes[victim].popen.send_signal(signal.SIGKILL)
            killed.append(victim)
        time.sleep(rng.uniform(0.5, 2.0))
        leaver = watcher.shared_ranges(killed)[0]
        nodes[leaver].popen.send_signal(signal.SIGINT)
        handed_off = finish(nodes[leaver], timeout=120)
        assert watcher.done.wait(400), "".join(watcher.lines)
        code = coordinator.popen.wait(timeout=60)
    output = "".join(watcher.lines)
    assert code == 0, output
    return load_job(job_file), tmp / "run", killed, output, (leaver, handed_off)


def test_the_job_completes_and_applies_every_step_once(chaos_run):
    _, run_dir, killed, output, _ = chaos_run
    assert len(killed) == KILLS
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert steps == list(range(STEPS)), output
    with AuditLog.open(run_dir / "audit.db") as log:
        entries = list(log.entries())
    syncs = [json.loads(e.payload) for e in entries if e.kind == "sync"]
    assert syncs, "the spare never took a killed node's place:\n" + output
    assert all(sync["node_id"] not in killed for sync in syncs)


def test_a_node_stopped_with_ctrl_c_hands_its_range_over_without_a_retry(chaos_run):
    _, _, _, output, (leaver, (code, node_output)) = chaos_run
    assert code == 0 and "handed off; left the swarm" in node_output, node_output
    stage = rf"node {leaver} \(blocks [^)]*\)"
    left = [line for line in output.splitlines() if re.search(stage + " leaves the chain", line)]
    assert len(left) == 1 and "it left, handing its range over at a step boundary" in left[0], output
    # no call to it failed or was retried
    assert not re.search(stage + " (dropped|failed|did not answer)", output), output


def test_the_final_adapter_is_the_undisturbed_one(chaos_run):
    job, run_dir, _, _, _ = chaos_run
    reference = train_reference(resolve_model(job.model), job)
    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert max(abs(a - b) for a, b in zip(losses, reference.losses)) <= 1e-4
    _, adapter = load_peft_adapter(run_dir / "adapter")
    assert adapter.keys() == reference.adapter.keys()
    worst = max((adapter[name] - reference.adapter[name]).abs().max().item() for name in adapter)
    assert worst <= ADAPTER_TOLERANCE, worst
    assert any(not torch.equal(adapter[name], torch.zeros_like(adapter[name])) for name in adapter)
