"""Replicated runs several test modules read: 2 ranges x 2 replicas with replay snapshots, one in float32 with
honest nodes, one with 8-bit codecs on every stream and one node that lies about its sketches."""

from __future__ import annotations

import pytest

from swarm.config import load_job
from swarm.identity import Identity
from tests.conftest import started_processes, write_job
from tests.integration.helpers import finish, join_flags

STEPS, STAGES, REPLICAS, MICRO_BATCHES = 4, 2, 2, 4


SNAPSHOTS = 2
CODECS_8BIT = {"forward": "uniform8bit", "backward": "uniform8bit", "averaging": "uniform8bit"}


def run_replicated(tmp, compression: dict | None = None, dishonest: str | None = None):
    """(job, run directory); with `dishonest`, the last node joins with `swarm-node join --dishonest`."""
    sections = {"compression": compression} if compression else {}
    job_file = write_job(tmp, training={"steps": STEPS, "batch_size": 8, "micro_batches": MICRO_BATCHES},
                         swarm={"min_nodes": STAGES * REPLICAS, "replicas": REPLICAS},
                         audit={"snapshots_per_phase": SNAPSHOTS}, **sections)
    local = STAGES * REPLICAS - (1 if dishonest else 0)
    with started_processes() as start:
        process = start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", str(local),
                        "--run-dir", str(tmp / "run"), "--node-threads", "1", "--no-progress", "--no-baseline")
        if dishonest:
            start("-m", "node.cli", "join", *join_flags(process), "--key", str(tmp / "liar.key"),
                  "--threads", "1", "--dishonest", dishonest)
        code, output = finish(process, timeout=300)
    assert code == 0, output
    return load_job(job_file), tmp / "run"

@pytest.fixture(scope="session")
def replicated_run(tmp_path_factory):
    """(job, run directory) of a float32 job over 2 ranges x 2 replicas."""
    return run_replicated(tmp_path_factory.mktemp("replicas"))


@pytest.fixture(scope="session")
def lying_8bit_run(tmp_path_factory):
    """(job, run directory, the liar's fingerprint): 8-bit codecs on every stream, and one node joined with
    `--dishonest wrong-sketch` (it applies the group's true sum but reports another gradient's sketch)."""
    tmp = tmp_path_factory.mktemp("replicas-8bit-liar")
    job, run_dir = run_replicated(tmp, CODECS_8BIT, dishonest="wrong-sketch")
    return job, run_dir, Identity.load_or_create(tmp / "liar.key").fingerprint
