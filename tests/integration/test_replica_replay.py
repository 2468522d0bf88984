"""`swarm-audit replay` on runs whose block ranges have replicas (2 ranges x 2 replicas): an honest run replays
with no error at all in float32, and a replica that reports the sketch of another summed gradient, or whose
own gradient is not what it attested, is named, alone, while the replica that summed with it is not blamed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from swarm.audit import replay
from swarm.audit.query import REPLAY_FILE
from tests.integration.conftest import REPLICAS, SNAPSHOTS, STAGES
from tests.integration.helpers import swarm_audit



@pytest.fixture(scope="module")
def honest_run(replicated_run):
    return replicated_run[1]


@pytest.fixture(scope="module")
def lying_run(lying_8bit_run):
    """Its codecs are 8-bit on every stream: replay simulates them, so honest nodes still replay exactly."""
    _, run_dir, liar = lying_8bit_run
    return run_dir, liar


def test_an_honest_replicated_run_replays_with_zero_error(honest_run):
    assert swarm_audit("verify", honest_run).returncode == 0
    replay = swarm_audit("replay", honest_run, "--sample", "1")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replay OK" in replay.stdout
    report = json.loads((honest_run / REPLAY_FILE).read_text())
    assert len(report["replayed"]) == SNAPSHOTS
    checks = [(step["step"], node) for step in report["replayed"] for node in step["nodes"]]
    assert len(checks) == SNAPSHOTS * STAGES * REPLICAS  # every replica of every range is held to its step
    # float32 throughout: each replica's own gradient (added up in the order it attested), the group's sum
    # and the AdamW step replay bit for bit
    for step, check in checks:
        errors = [check[name] for name in ("local_sketch_error", "sketch_error", "weights_error", "optimizer_error")]
        assert errors == [0.0, 0.0, 0.0, 0.0], (step, check)


def test_a_replica_reporting_a_wrong_summed_sketch_is_named_alone(lying_run):
    run_dir, liar = lying_run
    assert swarm_audit("verify", run_dir).returncode == 0  # every signature is valid, and the replicas agree
    replay = swarm_audit("replay", run_dir, "--sample", "1")
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert f"node {liar}" in replay.stdout
    report = json.loads((run_dir / REPLAY_FILE).read_text())
    assert set(report["failed_nodes"]) == {liar}  # not the replica it summed with, nor any other
    found = [finding for finding in report["findings"] if finding["node_id"] == liar]
    assert {finding["check"] for finding in found} == {"gradient sketch"}
    assert len(found) == SNAPSHOTS  # every replayed step catches it
    for check in (node for step in report["replayed"] for node in step["nodes"] if node["node_id"] == liar):
        assert check["local_sketch_error"] == 0.0 and check["weights_error"] == 0.0  # its own part was honest


def test_a_replica_whose_own_gradient_does_not_replay_is_named_alone(honest_run, tmp_path, monkeypatch):
    """As if one replica had signed that it took none of the micro-batches it did take at a step: its own gradient
    does not replay, so neither does the sum its whole range applied, and only it is blamed for that."""
    run_dir = tmp_path / "run"
    shutil.copytree(honest_run, run_dir)
    read_log = replay._read_log
    lied = {}

    def log_with_a_lie(path):
        records = read_log(path)
        step = min(records.snapshot_files)
        (liar, _), attestation = next((key, a) for key, a in sorted(records.attestations.items())
                                      if key[1] == step and a.micro_batches)
        records.attestations[(liar, step)] = dataclasses.replace(attestation, micro_batches=())
        lied.update(node=liar, step=step, blocks=(attestation.block_start, attestation.block_end))
        return records

    monkeypatch.setattr(replay, "_read_log", log_with_a_lie)
    report = replay.replay_run(run_dir, sample=1, seed=0)
    assert set(report.failed_nodes()) == {lied["node"]}
    assert {(f.step, f.check) for f in report.findings} == {
        (lied["step"], check) for check in
        ("local gradient sketch", "gradient sketch", "weights after the step", "optimizer state after the step")}
    checks = next(step for step in report.replayed if step.step == lied["step"]).nodes
    sibling = next(c for c in checks if (c.block_start, c.block_end) == lied["blocks"] and c.node_id != lied["node"])
    assert sibling.local_sketch_error == 0.0 and sibling.sketch_error > 0  # recorded, not held against it
