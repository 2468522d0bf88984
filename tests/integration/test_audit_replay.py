"""`swarm-audit replay` against a real run in which two of three nodes were started with the research switch
`--dishonest`: both are caught and named, the honest one is not, and `who` attributes the failed work.
(An all-honest run replays clean: tests/integration/test_audit_run.py.)"""

from __future__ import annotations

import json

import pytest

from swarm.audit.query import REPLAY_FILE
from swarm.identity import Identity
from tests.conftest import started_processes, write_job
from tests.integration.helpers import finish, join_flags, swarm_audit

PHASES = [
    {"kind": "pretrain", "steps": 3, "lr": 0.01, "loss_on": "all"},
    {"kind": "sft", "steps": 3, "lr": 0.01},
    {"kind": "sft", "steps": 2, "lr": 0.01, "adapter": "merge"},
]


LIARS = {"hidden-update": "weights after the step", "wrong-sketch": "gradient sketch"}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A 3-node run: one honest local node and, joined separately, one node per `--dishonest` mode."""
    tmp = tmp_path_factory.mktemp("replay")
    job_file = write_job(tmp, training={"steps": None, "batch_size": 4, "micro_batches": 2}, phases=PHASES,
                         audit={"snapshots_per_phase": 2}, swarm={"min_nodes": 3})
    run_dir = tmp / "run"
    with started_processes() as start:
        coordinator = start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "1", "--run-dir",
                            str(run_dir), "--node-threads", "1", "--no-progress", "--no-baseline")
        flags = join_flags(coordinator)
        for mode in LIARS:
            start("-m", "node.cli", "join", *flags, "--key", str(tmp / f"{mode}.key"), "--threads", "1",
                  "--dishonest", mode)
        code, output = finish(coordinator, timeout=400)
    assert code == 0, output
    return run_dir, {Identity.load_or_create(tmp / f"{mode}.key").fingerprint: mode for mode in LIARS}


def test_dishonest_nodes_are_caught_by_replay_and_named_by_who(mixed_run):
    run_dir, liars = mixed_run
    assert swarm_audit("verify", run_dir).returncode == 0  # every signature is valid: the lies are in the content
    replay = swarm_audit("replay", run_dir, "--sample", "1")
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert "replay FAILED" in replay.stdout and all(f"node {liar}" in replay.stdout for liar in liars)
    report = json.loads((run_dir / REPLAY_FILE).read_text())
    assert len(report["replayed"]) == 6  # 2 snapshots in each of 3 phases
    assert set(report["failed_nodes"]) == set(liars)  # the honest node is not blamed
    for liar, mode in liars.items():
        found = [finding for finding in report["findings"] if finding["node_id"] == liar]
        assert {finding["check"] for finding in found} == {LIARS[mode]}
        assert len(found) == 6  # every replayed step catches it
    who = swarm_audit("who", run_dir).stdout.splitlines()
    for liar in liars:
        assert "FAILED (6 findings)" in next(line for line in who if line.startswith(liar))
    assert sum(line.rstrip().endswith(" ok") for line in who) == 1
