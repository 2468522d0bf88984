"""A range loses its last replica, twice: one node SIGKILLed, one frozen with SIGSTOP (a straggler that never
answers) at random moments. Each time a spare takes the range over, every range goes back to the latest step
checkpoint and the steps after it are redone; the job completes with the adapter an undisturbed single
machine trains, every step once in the metrics, and an audit log that verifies."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from coordinator.run_dir import read_metrics
from swarm.audit import AuditLog
from swarm.config import load_job
from tests.conftest import random_seed, started_processes, write_job
from tests.integration.helpers import assert_undisturbed, start_swarm, swarm_audit

STEPS, NODES, EVERY = 30, 4, 5  # 2 ranges x 1 replica, two spares; a step checkpoint every 5 steps
LR = 0.002  # where this tiny model's training is not chaotic itself (see test_replicas.JOIN_LR)
RPC_TIMEOUT_S = 10.0  # how long the frozen node may stall the job
ADAPTER_TOLERANCE = 1e-4


def _applied(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"type": "train"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def takeover_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("takeover")
    job_file = write_job(tmp, training={"steps": STEPS, "batch_size": 8, "micro_batches": 4}, optimizer={"lr": LR},
                         swarm={"min_nodes": NODES, "stages": 2, "replicas": 1, "checkpoint_every": EVERY,
                                "heartbeat_interval_s": 0.5, "rpc_timeout_s": RPC_TIMEOUT_S})
    run_dir = tmp / "run"
    rng = random.Random(random_seed("takeover: when and whom to stop"))
    victims = []
    with started_processes() as start:
        watcher, nodes = start_swarm(start, job_file, run_dir, tmp, NODES)
        for signum, after_step in ((signal.SIGKILL, rng.randint(EVERY + 1, 12)), (signal.SIGSTOP, rng.randint(17, 23))):
            deadline = time.monotonic() + 300
            while _applied(run_dir) < after_step and not watcher.done.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))  # anywhere in a step: forward, backward or the step itself
            victim = rng.choice(sorted(watcher.serving - set(victims)))
            nodes[victim].popen.send_signal(signum)
            victims.append(victim)
            watcher.serving.discard(victim)
        assert watcher.done.wait(400), "".join(watcher.lines)
        code = watcher.process.popen.wait(timeout=60)
    output = "".join(watcher.lines)
    assert code == 0, output
    return load_job(job_file), run_dir, victims, output


def _events(run_dir, kind: str) -> list[dict]:
    with AuditLog.open(run_dir / "audit.db") as log:
        return [json.loads(entry.payload) for entry in log.entries() if entry.kind == kind]


def test_each_lost_range_is_taken_over_by_a_spare_from_a_step_checkpoint(takeover_run):
    _, run_dir, victims, output = takeover_run
    rollbacks = _events(run_dir, "rollback")
    assert len(rollbacks) == 2, output
    assert all(event["from_step"] % EVERY == 0 and event["phase_step"] == event["from_step"] for event in rollbacks)
    assert "did not answer" in rollbacks[1]["reason"], rollbacks[1]  # the frozen node, dropped at its timeout
    assignments = _events(run_dir, "assignment")
    first = {event["node_id"] for event in assignments[:2]}
    takers = [event["node_id"] for event in assignments[2:]]
    assert len(takers) == 2 and not set(takers) & first, assignments  # the spares took over
    assert victims[0] in first and victims[1] in first | {takers[0]}, (victims, assignments)
    assert output.count("took over blocks") == 2, output


def test_every_step_appears_once_and_the_log_verifies_and_replays(takeover_run):
    _, run_dir, _, output = takeover_run
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert steps == list(range(STEPS)), output
    verified = swarm_audit("verify", run_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the takers' first steps start from the checkpoint they loaded (a load_state event), not fresh state
    takers = {event["node_id"] for event in _events(run_dir, "assignment")[2:]}
    assert takers <= {event["node_id"] for event in _events(run_dir, "load_state")}
    replayed = swarm_audit("replay", run_dir, "--sample", "1")
    assert replayed.returncode == 0 and "replay OK" in replayed.stdout, replayed.stdout + replayed.stderr


def test_the_final_adapter_is_the_undisturbed_one(takeover_run):
    job, run_dir, _, _ = takeover_run
    assert_undisturbed(job, run_dir, ADAPTER_TOLERANCE)
