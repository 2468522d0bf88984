"""`verify_log` on replica groups: the replicas of a block range agree, at every step, on the weights and AdamW
state after it and on who summed gradients with whom, and that group is exactly the range's assigned nodes
that attested the step. Logs written through the public API with real keys; each rule broken once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from swarm.audit import AuditLog, verify_log
from swarm.audit.attestation import Attestation, MicroBatch, replica_group, sign_attestation
from swarm.identity import Identity

JOB = "replica-test"
PHASE = "train"
RANGES = [(0, 2), (2, 4)]
REPLICAS = 2
MICRO_BATCHES = 4


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ReplicaLog:
    """A job of 2 ranges x 2 replicas, joined and assigned; tests append the attestations."""

    path: Path
    coordinator: Identity
    replicas: list[list[Identity]]  # per range, in summation order

    def attestation(self, node: Identity, step: int, blocks: tuple[int, int], group: list[Identity],
                    **changes) -> Attestation:
        """What an honest replica attests: the range's shared state, the micro-batches it took, its group."""
        index = group.index(node) if node in group else 0
        start, end = blocks
        honest = Attestation(
            job_id=JOB, phase=PHASE, step=step, block_start=start, block_end=end,
            replica_group=replica_group(start, end), node_id=node.fingerprint,
            micro_batches=tuple(MicroBatch(m, digest(f"{step}/{start}/{m}"))
                                for m in range(MICRO_BATCHES) if m % len(group) == index),
            adapter_sha256_before=digest(f"weights/{start}/{step}"),
            adapter_sha256_after=digest(f"weights/{start}/{step + 1}"),
            optimizer_sha256_before=digest(f"adamw/{start}/{step}"),
            optimizer_sha256_after=digest(f"adamw/{start}/{step + 1}"),
            gradient_sketch=(0.5, -0.25, float(step)), tokens=40, compute_seconds=1.0, bytes_sent=100,
            bytes_received=100, averaged_with=tuple(member.fingerprint for member in group),
            local_gradient_sketch=(0.25 * index, -0.125, float(step)),
        )  # fmt: skip
        return replace(honest, **changes)

    def append(self, *attestations: Attestation, events: tuple[tuple[str, dict], ...] = ()) -> list[int]:
        """Append the events, then the attestations (each signed by its node), then sign a tree head."""
        keys = {node.fingerprint: node for nodes in self.replicas for node in nodes}
        with AuditLog.open(self.path, self.coordinator) as log:
            for kind, fields in events:
                log.append_event(kind, **fields)
            indices = [log.append_attestation(sign_attestation(a, keys[a.node_id])).index for a in attestations]
            log.sign_tree_head()
        return indices

    def honest_step(self, step: int) -> list[Attestation]:
        return [self.attestation(node, step, blocks, group)
                for blocks, group in zip(RANGES, self.replicas) for node in group]


@pytest.fixture
def replica_log(tmp_path) -> ReplicaLog:
    built = ReplicaLog(tmp_path / "audit.db", Identity.generate(),
                       [[Identity.generate() for _ in range(REPLICAS)] for _ in RANGES])
    with AuditLog.create(built.path, built.coordinator, JOB, model="llama-micro", seed=0) as log:
        for (start, end), nodes in zip(RANGES, built.replicas):
            for node in nodes:
                log.register_node(node.public_key, hostname="host")
                log.append_event("assignment", node_id=node.fingerprint, block_start=start, block_end=end,
                                 replica_group=replica_group(start, end))
        log.append_event("phase", phase=PHASE)
    return built


def only_problem(path: Path):
    report = verify_log(path)
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_replicas_that_agree_at_every_step_verify(replica_log):
    replica_log.append(*replica_log.honest_step(0), *replica_log.honest_step(1))
    report = verify_log(replica_log.path)
    assert report.ok, report.problems
    assert report.attestations == 2 * len(RANGES) * REPLICAS


def test_replicas_attesting_different_weights_after_a_step_are_named_at_the_second(replica_log):
    a, b = replica_log.replicas[0]
    step = replica_log.honest_step(1)
    step[1] = replace(step[1], adapter_sha256_after=digest("nudged"))
    indices = replica_log.append(*replica_log.honest_step(0), *step)
    problem = only_problem(replica_log.path)
    assert problem.index == indices[len(step) + 1]  # b's attestation of step 1
    assert problem.reason.startswith("step 1 (train) blocks 0..1: replicas attest different weights after the step")
    assert a.fingerprint in problem.reason and b.fingerprint in problem.reason
    assert digest("nudged")[:12] in problem.reason


def test_replicas_attesting_different_optimizer_state_after_a_step_are_named(replica_log):
    a, b = replica_log.replicas[1]
    step = replica_log.honest_step(0)
    step[3] = replace(step[3], optimizer_sha256_after=digest("other moments"))
    indices = replica_log.append(*step)
    problem = only_problem(replica_log.path)
    assert problem.index == indices[3]
    assert problem.reason.startswith("step 0 (train) blocks 2..3: replicas attest different optimizer state")
    assert a.fingerprint in problem.reason and b.fingerprint in problem.reason


def test_replicas_naming_their_group_in_different_orders_are_named(replica_log):
    a, b = replica_log.replicas[0]
    step = replica_log.honest_step(0)
    step[1] = replace(step[1], averaged_with=(b.fingerprint, a.fingerprint))
    indices = replica_log.append(*step)
    problem = only_problem(replica_log.path)
    assert problem.index == indices[1]
    assert "step 0 (train) blocks 0..1: replicas say they summed gradients in different groups" in problem.reason
    assert f"[{a.fingerprint}, {b.fingerprint}]" in problem.reason
    assert f"[{b.fingerprint}, {a.fingerprint}]" in problem.reason


def test_a_group_naming_a_replica_that_did_not_attest_the_step_is_named(replica_log):
    a, b = replica_log.replicas[0]
    step = [attestation for attestation in replica_log.honest_step(0) if attestation.node_id != b.fingerprint]
    indices = replica_log.append(*step)
    problem = only_problem(replica_log.path)
    assert problem.index == indices[0]
    assert problem.reason == (f"step 0 (train) blocks 0..1: node {a.fingerprint} summed gradients with "
                              f"{a.fingerprint}, {b.fingerprint}, but the nodes that attested these blocks at "
                              f"this step are {a.fingerprint}")


def test_two_nodes_attesting_one_range_at_one_step_each_alone_are_named(replica_log):
    a, b = replica_log.replicas[0]
    alone = [replica_log.attestation(node, 0, RANGES[0], [a, b], averaged_with=(), local_gradient_sketch=())
             for node in (a, b)]
    indices = replica_log.append(*alone)
    problem = only_problem(replica_log.path)
    assert problem.index == indices[0]
    assert problem.reason == (f"step 0 (train) blocks 0..1: node {a.fingerprint} summed gradients with no one "
                              f"(it says it stepped alone), but the nodes that attested these blocks at this step "
                              f"are {a.fingerprint}, {b.fingerprint}")


def test_a_replica_without_an_assignment_for_its_range_is_named(replica_log):
    a, b = replica_log.replicas[0]
    c = replica_log.replicas[1][0]  # assigned blocks 2..3, yet it attests 0..1 in a's group
    attestations = [replica_log.attestation(node, 0, RANGES[0], [a, c]) for node in (a, c)]
    indices = replica_log.append(*attestations)
    problem = only_problem(replica_log.path)
    assert problem.index == indices[1]
    assert problem.reason == (f"step 0 (train) blocks 0..1: node {c.fingerprint} attests these blocks as a "
                              f"replica, but no assignment event before its attestation gives it blocks 0..1")


def test_a_step_redone_after_a_resume_is_checked_on_its_new_attestations_only(replica_log):
    a, _ = replica_log.replicas[0]
    # a's step before the crash (its replica never got to attest it) ended elsewhere than the redone one
    crashed = replica_log.attestation(a, 1, RANGES[0], replica_log.replicas[0], adapter_sha256_after=digest("lost"))
    replica_log.append(*replica_log.honest_step(0), crashed)
    replica_log.append(*replica_log.honest_step(1), events=(("resume", {"from_step": 1, "phase": PHASE}),))
    report = verify_log(replica_log.path)
    assert report.ok, report.problems
