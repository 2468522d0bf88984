"""`swarm-audit replay`: re-execute sampled attested steps and hold each node to what it signed.

For every attested step the log alone lets us check that each node's chain of states is unbroken: the
weights and AdamW state a step starts from are those the node's previous step ended with, and every phase
starts from fresh optimizer state. For the steps the coordinator snapshotted (swarm.audit.snapshot) we
re-run the whole model on one machine, from the snapshot's weights and the job's own data, and compare per
node:

- exactly: the snapshot's states hash to what the node attested (before and after);
- within `sketch_tolerance` (relative L2): the gradient sketch the node reported against the sketch of the
  gradient the replay computes for its blocks;
- within `state_tolerance` (relative to the size of the step's update): the weights and AdamW state after
  the node's step against one AdamW step applied here to the replayed gradient.

A node that slipped an update of its own into its weights, or reported the sketch of another gradient,
fails one of these at every replayed step, and the finding names its fingerprint.

Replicas (a range served by several nodes whose attestations name their group in `averaged_with`): each
replica's own gradient is replayed from the micro-batches it attested and held to its
`local_gradient_sketch`; the group's sum is then recomputed exactly as the nodes compute it
(swarm.p2p.replica_sum, in `averaged_with` order, through the job's averaging codec) and every replica is
held to it: its `gradient_sketch` and its AdamW step. A range's blocks are built once; each micro-batch runs
through them with the weights of the replica that attested it. When a replica's own gradient does not
replay, the sum it went into cannot be replayed either: that replica is named, and the other replicas'
mismatches against the replayed sum are recorded in their checks but not held against them.

This module reads the log and checks the state chains; swarm.audit.replay_step re-executes a step,
swarm.audit.replay_range one block range of it, and swarm.audit.replay_report holds what was found.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarm.audit.attestation import DEFAULT_SKETCH_TOLERANCE, DEFAULT_STATE_TOLERANCE, Attestation
from swarm.audit.canonical import parse_json_object
from swarm.audit.entry import ATTESTATION, REDO_KINDS
from swarm.audit.log import AuditLog
from swarm.audit.replay_report import Finding, ReplayError, ReplayReport, StepCheck, write_report
from swarm.audit.replay_step import StepReplayer
from swarm.audit.verify import verify_log
from swarm.config import Job, load_job
from swarm.models.checkpoint import tensors_sha256

__all__ = ["ReplayError", "ReplayReport", "replay_run", "write_report"]


def replay_run(run_dir: str | Path, sample: float, seed: int | None = None, cache_dir: Path | None = None,
               sketch_tolerance: float = DEFAULT_SKETCH_TOLERANCE, state_tolerance: float = DEFAULT_STATE_TOLERANCE,
               on_step: Callable[[StepCheck], None] | None = None) -> ReplayReport:
    """Check every node's attested state chain, then replay `sample` (0..1] of the snapshotted steps."""
    if not 0 < sample <= 1:
        raise ReplayError(f"--sample must be in (0, 1], not {sample}")
    run_dir = Path(run_dir)
    log_path = run_dir / "audit.db"
    if not log_path.is_file():
        raise ReplayError(f"{run_dir} has no audit.db")
    verified = verify_log(log_path)
    if not verified.ok:
        raise ReplayError(f"the audit log does not verify ({verified.first_bad}); run `swarm-audit verify` first")
    records = _read_log(log_path)
    job = _job(run_dir, records.job_sha256)
    findings = _check_chains(records.attestations, records.taken_states)
    snapshots = sorted(records.snapshot_files)
    if not snapshots:
        raise ReplayError(f"{run_dir} has no replay snapshots (audit.snapshots_per_phase was 0?)")
    count = max(1, round(sample * len(snapshots)))
    chosen = sorted((random.Random(seed) if seed is not None else random.SystemRandom()).sample(snapshots, count))
    replayer = StepReplayer(run_dir, job, records, cache_dir, sketch_tolerance, state_tolerance)
    replayed = []
    for step in chosen:
        check, step_findings = replayer.replay(step)
        replayed.append(check)
        findings.extend(step_findings)
        if on_step is not None:
            on_step(check)
    return ReplayReport(len(snapshots), replayed, len(records.attestations), findings, sketch_tolerance,
                        state_tolerance)


@dataclass
class LogRecords:
    """What replay takes from the audit log: attestations, recorded files and snapshots, states nodes took."""

    job_sha256: str
    attestations: dict[tuple[str, int], Attestation]  # (node id, step) -> attestation
    files: dict[str, str]  # run-relative path -> SHA-256 from its checkpoint event
    snapshot_files: dict[int, str]  # step -> run-relative snapshot path
    # (node id, phase, step) -> (weights, optimizer state) hashes the node took after that step: a replica's
    # copy (`sync`) or a step checkpoint (`load_state`); its next step starts from them
    taken_states: dict[tuple[str, str, int], tuple[str, str]] = field(default_factory=dict)


def _read_log(path: Path) -> LogRecords:
    attestations, files, snapshots, job_sha256, taken = {}, {}, {}, "", {}
    with AuditLog.open(path) as log:
        for entry in log.entries():
            if entry.kind == ATTESTATION:
                attestation = Attestation.from_bytes(entry.payload)
                attestations[(attestation.node_id, attestation.step)] = attestation
                continue
            event = parse_json_object(entry.payload)
            if entry.kind in REDO_KINDS:  # work from from_step on was redone after it: only the redone counts
                redone = int(event["from_step"])
                attestations = {key: value for key, value in attestations.items() if key[1] < redone}
                snapshots = {step: path for step, path in snapshots.items() if step < redone}
            if entry.kind == "job_start":
                job_sha256 = event.get("job_sha256", "")
            elif entry.kind == "checkpoint" and "path" in event:
                files[event["path"]] = event["sha256"]
                if "replay_step" in event:
                    snapshots[int(event["replay_step"])] = event["path"]
            elif entry.kind in ("sync", "load_state") and "weights_sha256" in event:
                taken[(event["node_id"], event.get("phase", ""), int(event["step"]))] = (
                    event["weights_sha256"], event.get("optimizer_sha256", ""))
    return LogRecords(job_sha256, attestations, files, snapshots, taken)


def _job(run_dir: Path, logged_sha256: str) -> Job:
    job_file = run_dir / "job.yaml"
    if not job_file.is_file():
        raise ReplayError(f"{run_dir} has no job.yaml")
    if logged_sha256 and hashlib.sha256(job_file.read_bytes()).hexdigest() != logged_sha256:
        raise ReplayError(f"{job_file} is not the job file the log's job_start names (SHA-256 differs)")
    return load_job(job_file)


def _check_chains(attestations: dict[tuple[str, int], Attestation],
                  taken: dict[tuple[str, str, int], tuple[str, str]]) -> list[Finding]:
    """Within a phase, a node's step starts from exactly the weights and AdamW state its previous step ended
    with, and its first step from fresh AdamW state (every phase starts a new optimizer); either may instead
    be a state the log says the node took just before (a replica's copy, a step checkpoint: `taken`)."""
    fresh = tensors_sha256({})
    by_node_phase: dict[tuple[str, str], list[Attestation]] = defaultdict(list)
    for attestation in attestations.values():
        by_node_phase[(attestation.node_id, attestation.phase)].append(attestation)
    findings = []
    for (node, phase), steps in sorted(by_node_phase.items()):
        steps.sort(key=lambda a: a.step)

        def took(step: Attestation, node=node, phase=phase) -> bool:
            before = (step.adapter_sha256_before, step.optimizer_sha256_before)
            return taken.get((node, phase, step.step - 1)) == before

        if steps[0].optimizer_sha256_before != fresh and not took(steps[0]):
            findings.append(Finding(node, phase, steps[0].step, "state chain",
                                    "the phase's first step does not start from fresh optimizer state"))
        for previous, following in zip(steps, steps[1:]):
            if took(following):
                continue
            if following.adapter_sha256_before != previous.adapter_sha256_after:
                findings.append(Finding(node, phase, following.step, "state chain",
                                        f"starts from weights other than those step {previous.step} ended with"))
            if following.optimizer_sha256_before != previous.optimizer_sha256_after:
                findings.append(Finding(node, phase, following.step, "state chain",
                                        f"starts from optimizer state other than step {previous.step} ended with"))
    return findings
