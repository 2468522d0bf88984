"""What the phase loop (coordinator.phases) works with: `PhaseContext`, a run's fixed wiring (job, chain, trainer
head, run directory, metrics, audit log), its `PhaseProgress` (the counters and lineage that coordinator.resume
restores), and `SwarmControl`, what the loop asks of the live swarm between steps; and how the loop's parts
record what they write in the audit log.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coordinator.chain import RangeLostError, RemoteChain
from coordinator.run_dir import MetricsLog
from coordinator.step_checkpoint import StepCheckpoint
from swarm.audit.log import AuditLog
from swarm.config import Job, PhaseSpec
from swarm.data.tasks import Example
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import Checkpoint


class SwarmControl(Protocol):
    """What the phase loop asks of the swarm around steps (coordinator.session.SwarmSession)."""

    def admit_nodes(self, phase: str, kind: str, last_step: int) -> None:
        """Between steps: drop replicas whose node went, make nodes that loaded their blocks replicas."""

    def recover(self, error: RangeLostError) -> None:
        """Give every range without a replica a node (waiting for one to join), or raise."""

    def record_step(self, step: int) -> None:
        """`step` steps are applied (the status page shows it)."""


@dataclass
class PhaseProgress:
    """Where the run is: what a phase leaves for the next, and what `coordinator.resume` restores."""

    base_dir: str = ""  # the base model later adapters apply to (the checkpoint, or the pretrained model)
    merged: list[str] = field(default_factory=list)  # adapters merged into that base, in order
    previous_adapter: Path | None = None  # the last finished LoRA phase's adapter
    step: int = 0  # global optimizer step id
    safety_step: int = 0
    seen_backdoor: bool = False
    last_checkpoint: StepCheckpoint | None = None  # the latest step checkpoint written (or resumed from)
    self_responses: list[Example] | None = None  # data.responses self: the records the LoRA phases train on


@dataclass(frozen=True)
class PhaseContext:
    """The phase loop's wiring, fixed for a run, and its `progress`."""

    job: Job
    checkpoint: Checkpoint
    tokenizer: object
    chain: RemoteChain
    head: TrainerHead
    run_dir: Path
    metrics: MetricsLog
    progress_bars: bool = True
    swarm: SwarmControl | None = None  # None: a fixed chain (tests, benches): no admissions, no takeover
    audit: AuditLog | None = None
    progress: PhaseProgress = field(default_factory=PhaseProgress)
    # Draws the replay snapshot steps; from the OS, not the job seed, so no node can know them in advance.
    snapshot_rng: random.Random = field(default_factory=random.SystemRandom)


def phase_dir(run_dir: Path, index: int, phase: PhaseSpec) -> Path:
    """Where phase `index` (0-based) leaves its result: `adapter/` and `lineage.json`, or `model/` for pretrain."""
    return run_dir / "phases" / f"{index + 1:02d}-{phase.name}"


def record_checkpoint(context: PhaseContext, directory: Path, phase: str) -> None:
    """A `checkpoint` event per weights file saved in `directory`: its path in the run and its SHA-256."""
    for weights in sorted(directory.glob("*.safetensors")):
        record_file(context, weights, phase=phase)


def record_file(context: PhaseContext, path: Path, **fields) -> None:
    """A `checkpoint` event for a file the run wrote: its path in the run, SHA-256 and size (no audit log: none)."""
    if context.audit is None:
        return
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    context.audit.append_event("checkpoint", path=str(path.relative_to(context.run_dir)), sha256=digest,
                               bytes=path.stat().st_size, **fields)


def audit_event(context: PhaseContext, kind: str, **fields) -> None:
    """An event of the phase loop in the audit log (no audit log: none)."""
    if context.audit is not None:
        context.audit.append_event(kind, **fields)
