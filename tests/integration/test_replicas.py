"""Replicas on a real swarm: 2 ranges x 2 replicas train the same model as one machine, the replicas of a
range sum their gradients node to node and attest identical weights after every step, and the bytes they
exchange match the adapter's size."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
from safetensors.torch import load_file

from coordinator.run_dir import read_metrics
from swarm.audit import AuditLog
from swarm.audit.attestation import Attestation
from swarm.config import load_job
from swarm.models.checkpoint import resolve_model
from swarm.reference import train_reference
from tests.conftest import started_processes, write_job
from tests.integration.conftest import MICRO_BATCHES, REPLICAS, STAGES, STEPS
from tests.integration.helpers import finish, join_flags, read_until, start_warm_node

# Measured: 8-bit activations, gradients and averaging move this job's losses (about 4.7) by at most 0.009.
LOSS_TOLERANCE_8BIT = 0.08
MESSAGE_OVERHEAD = 512  # bytes of metadata and framing per part sent, generously


@pytest.fixture(scope="module")
def fp32_run(replicated_run):
    return replicated_run


@pytest.fixture(scope="module")
def int8_run(lying_8bit_run):
    """8-bit codecs on every stream (one node misreports its sketches, which changes no weight)."""
    return lying_8bit_run[:2]


def train_losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]


def attestations(run_dir) -> list[Attestation]:
    with AuditLog.open(run_dir / "audit.db") as log:
        return [Attestation.from_bytes(e.payload) for e in log.entries() if e.kind == "attestation"]


def by_step_and_range(run_dir) -> dict[tuple[int, int, int], list[Attestation]]:
    groups = defaultdict(list)
    for attestation in attestations(run_dir):
        groups[(attestation.step, attestation.block_start, attestation.block_end)].append(attestation)
    return groups


def test_two_replicas_per_range_train_like_one_machine(fp32_run):
    job, run_dir = fp32_run
    reference = train_reference(resolve_model(job.model), job).losses
    losses = train_losses(run_dir)
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4, (losses, reference)


def test_replicas_split_the_micro_batches_and_attest_identical_weights_every_step(fp32_run):
    _, run_dir = fp32_run
    groups = by_step_and_range(run_dir)
    assert len(groups) == STEPS * STAGES
    nodes_per_range = defaultdict(set)
    for (step, start, end), group in groups.items():
        assert len(group) == REPLICAS
        assert len({a.adapter_sha256_after for a in group}) == 1, (step, start)
        assert len({a.optimizer_sha256_after for a in group}) == 1, (step, start)
        assert len({a.gradient_sketch for a in group}) == 1  # the same summed gradient
        assert group[0].averaged_with == group[1].averaged_with  # summed in the same order
        assert {a.node_id for a in group} == set(group[0].averaged_with)
        # every micro-batch went through exactly one replica of the range
        processed = [batch.id for a in group for batch in a.micro_batches]
        assert sorted(processed) == list(range(MICRO_BATCHES)), (step, start, processed)
        assert group[0].local_gradient_sketch != group[1].local_gradient_sketch
        nodes_per_range[(start, end)] |= {a.node_id for a in group}
    assert all(len(nodes) == REPLICAS for nodes in nodes_per_range.values())
    assert len(set().union(*nodes_per_range.values())) == STAGES * REPLICAS


def averaging_payload(run_dir) -> tuple[int, int]:
    """(bytes of float32 values the replicas exchange per step, each way; parts sent per step).

    Each replica sends each other replica that one's 1/R of its gradient and answers with the sum of its own
    1/R: per range and step, 2 x (R - 1) parts of values/R each, R times."""
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    layer = lambda name: int(re.search(r"layers\.(\d+)\.", name).group(1))  # noqa: E731
    ranges = sorted({(a.block_start, a.block_end) for a in attestations(run_dir)})
    values = {r: sum(t.numel() for name, t in adapter.items() if r[0] <= layer(name) < r[1]) for r in ranges}
    return sum(2 * (REPLICAS - 1) * values[r] * 4 for r in ranges), len(ranges) * REPLICAS * 2 * (REPLICAS - 1)


def test_averaging_bytes_match_the_adapter_size(fp32_run):
    _, run_dir = fp32_run
    payload, parts = averaging_payload(run_dir)
    for row in (r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"):
        average = row["stream_bytes"]["average"]
        for direction in ("sent", "received"):
            assert payload <= average[direction] <= payload + parts * MESSAGE_OVERHEAD, (row["step"], average)
    report = (run_dir / "report.md").read_text()
    total = sum(r["stream_bytes"]["average"]["sent"] for r in read_metrics(run_dir / "metrics.jsonl")
                if r["type"] == "train")
    assert f"| average | {total / 1e6:.2f} |" in report  # the final report's per-stream table


def test_8bit_codecs_keep_replicas_identical_and_the_loss_close(int8_run):
    job, run_dir = int8_run
    reference = train_reference(resolve_model(job.model), job).losses
    differences = [abs(a - b) for a, b in zip(train_losses(run_dir), reference)]
    assert len(differences) == STEPS and 0 < max(differences) <= LOSS_TOLERANCE_8BIT, differences
    for group in by_step_and_range(run_dir).values():
        assert len({a.adapter_sha256_after for a in group}) == 1
    payload, parts = averaging_payload(run_dir)
    for row in (r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"):
        sent = row["stream_bytes"]["average"]["sent"]
        # 1 byte per value plus a 256-entry float32 codebook per part (uniform 8-bit)
        assert payload / 4 <= sent <= payload / 4 + parts * (MESSAGE_OVERHEAD + 1024), (row["step"], sent)


JOIN_STEPS = 60
# At lr 0.01 this tiny model's training is chaotic: a float-rounding difference of 1e-7 (micro-batches summed
# in another grouping) grows to 0.3 in the loss within 30 steps, swarm or not. At 0.002 it stays at 1e-7.
JOIN_LR = 0.002


@pytest.fixture(scope="module")
def joined_run(tmp_path_factory):
    """Two ranges, one node each, `replicas: auto`; a third node joins once training is under way."""
    tmp = tmp_path_factory.mktemp("mid-job-join")
    job_file = write_job(tmp, training={"steps": JOIN_STEPS, "batch_size": 8, "micro_batches": MICRO_BATCHES},
                         swarm={"min_nodes": 2, "replicas": "auto", "stages": 2}, optimizer={"lr": JOIN_LR})
    with started_processes() as start:
        late, join = start_warm_node(start)  # joins within seconds of training's start, however loaded the machine
        coordinator = start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "2", "--run-dir",
                            str(tmp / "run"), "--node-threads", "1", "--no-progress", "--no-baseline")
        flags = join_flags(coordinator)
        read_until(coordinator, r"chain: ", timeout=120)
        join([*flags, "--key", str(tmp / "late.key"), "--threads", "1"])
        code, output = finish(coordinator, timeout=400)
        assert code == 0, output
        finish(late, timeout=60)
    return load_job(job_file), tmp / "run", output


def test_a_node_joining_mid_job_copies_a_replica_and_trains_on_identically(joined_run):
    job, run_dir, output = joined_run
    with AuditLog.open(run_dir / "audit.db") as log:
        syncs = [json.loads(e.payload) for e in log.entries() if e.kind == "sync"]
    assert len(syncs) == 1, output
    sync = syncs[0]
    late, joined_after = sync["node_id"], sync["step"]
    assert 0 <= joined_after < JOIN_STEPS - 1, sync
    late_work = [a for a in attestations(run_dir) if a.node_id == late]
    assert sorted(a.step for a in late_work) == list(range(joined_after + 1, JOIN_STEPS))
    assert sum(len(a.micro_batches) for a in late_work) > 0  # it got micro-batches, not only the sums
    for group in by_step_and_range(run_dir).values():
        assert len({a.adapter_sha256_after for a in group}) == 1
        if any(a.node_id == late for a in group):
            assert len(group) == 2 and all(late in a.averaged_with for a in group)
    reference = train_reference(resolve_model(job.model), job).losses
    assert max(abs(a - b) for a, b in zip(train_losses(run_dir), reference)) <= 1e-4
