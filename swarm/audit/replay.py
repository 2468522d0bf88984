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
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch

from swarm.audit.attestation import DEFAULT_SKETCH_TOLERANCE, DEFAULT_STATE_TOLERANCE, Attestation
from swarm.audit.canonical import parse_json_object
from swarm.audit.entry import ATTESTATION, REDO_KINDS
from swarm.audit.errors import AuditError
from swarm.audit.log import AuditLog
from swarm.audit.query import REPLAY_FILE
from swarm.audit.replay_range import RangeReplay
from swarm.audit.sketch import gradient_sketch
from swarm.audit.snapshot import NodeStepState, StepSnapshot, read_snapshot
from swarm.audit.verify import verify_log
from swarm.config import Job, load_job
from swarm.data.batches import TrainingData
from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
from swarm.data.tokenizer import load_tokenizer
from swarm.lora import adapter_state, base_parameters, lora_block_stack
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import DTYPES, Checkpoint, resolve_model, tensors_sha256
from swarm.p2p.codecs import CODECS, codec_type, round_trip
from swarm.p2p.replica_sum import flatten_gradient, group_sum, unflatten_gradient
from swarm.training import learning_rate, make_optimizer, position_ids_for, summed_lm_loss

COORDINATOR = "coordinator"


class ReplayError(AuditError):
    """The run directory cannot be replayed at all (no verified log, no snapshots, unusable files)."""


@dataclass
class Finding:
    """One thing that does not hold: which node (or the coordinator), which step, which check, by how much."""

    node_id: str
    phase: str
    step: int
    check: str
    detail: str

    def __str__(self) -> str:
        return f"node {self.node_id} step {self.step} ({self.phase}): {self.check}: {self.detail}"


@dataclass
class NodeCheck:
    node_id: str
    block_start: int
    block_end: int
    sketch_error: float
    weights_error: float
    optimizer_error: float
    local_sketch_error: float | None = None  # replicas: the node's own gradient against its local sketch


@dataclass
class StepCheck:
    step: int
    phase: str
    nodes: list[NodeCheck] = field(default_factory=list)


@dataclass
class ReplayReport:
    snapshots: int  # snapshotted steps in the run
    replayed: list[StepCheck]
    attested_steps: int  # attestations whose state chain was checked
    findings: list[Finding]
    sketch_tolerance: float
    state_tolerance: float

    @property
    def ok(self) -> bool:
        return not self.findings

    def failed_nodes(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for finding in self.findings:
            counts[finding.node_id] += 1
        return dict(counts)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "snapshots": self.snapshots, "attested_steps": self.attested_steps,
                "sketch_tolerance": self.sketch_tolerance, "state_tolerance": self.state_tolerance,
                "replayed": [asdict(step) for step in self.replayed],
                "findings": [asdict(finding) for finding in self.findings],
                "failed_nodes": self.failed_nodes()}


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
    replayer = _Replayer(run_dir, job, records, cache_dir, sketch_tolerance, state_tolerance)
    replayed = []
    for step in chosen:
        check, step_findings = replayer.replay(step)
        replayed.append(check)
        findings.extend(step_findings)
        if on_step is not None:
            on_step(check)
    return ReplayReport(len(snapshots), replayed, len(records.attestations), findings, sketch_tolerance,
                        state_tolerance)


def write_report(run_dir: Path, report: ReplayReport) -> Path:
    path = Path(run_dir) / REPLAY_FILE
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


@dataclass
class _LogRecords:
    job_sha256: str
    attestations: dict[tuple[str, int], Attestation]  # (node id, step) -> attestation
    files: dict[str, str]  # run-relative path -> SHA-256 from its checkpoint event
    snapshot_files: dict[int, str]  # step -> run-relative snapshot path
    # (node id, phase, step) -> (weights, optimizer state) hashes the node took after that step: a replica's
    # copy (`sync`) or a step checkpoint (`load_state`); its next step starts from them
    taken_states: dict[tuple[str, str, int], tuple[str, str]] = field(default_factory=dict)


def _read_log(path: Path) -> _LogRecords:
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
    return _LogRecords(job_sha256, attestations, files, snapshots, taken)


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


class _Replayer:
    def __init__(self, run_dir: Path, job: Job, records: _LogRecords, cache_dir: Path | None,
                 sketch_tolerance: float, state_tolerance: float):
        self.run_dir, self.job, self.records, self.cache_dir = run_dir, job, records, cache_dir
        self.sketch_tolerance, self.state_tolerance = sketch_tolerance, state_tolerance
        if job.lora.dropout > 0:
            raise ReplayError("lora.dropout > 0 makes every step random; replay needs dropout 0")
        self.dtype = DTYPES[job.model.dtype]
        self.job_checkpoint = Checkpoint.open(resolve_model(job.model, cache_dir))
        self.tokenizer = load_tokenizer(self.job_checkpoint.path, job.data.chat_format)
        self.codecs = (codec_type(job.compression.forward), codec_type(job.compression.backward))
        self.averaging_codec = codec_type(job.compression.averaging)

    def _wire(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.codecs == (CODECS["none"], CODECS["none"]):
            return hidden
        return _Wire.apply(hidden, *self.codecs)

    def _checked_file(self, relative: str) -> Path:
        path = self.run_dir / relative
        expected = self.records.files.get(relative)
        if expected is None:
            raise ReplayError(f"{relative} has no checkpoint event in the audit log")
        if not path.is_file():
            raise ReplayError(f"{path} is missing")
        with path.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != expected:
                raise ReplayError(f"{path} differs from the file the audit log recorded (SHA-256)")
        return path

    def replay(self, step: int) -> tuple[StepCheck, list[Finding]]:
        snapshot = read_snapshot(self._checked_file(self.records.snapshot_files[step]))
        phase = self.job.phase_list[snapshot.phase_index]
        if phase.name != snapshot.phase or snapshot.step != step:
            raise ReplayError(f"snapshot of step {step} names phase {snapshot.phase!r}, step {snapshot.step}")
        findings = []
        checkpoint = self._base(snapshot)
        head = TrainerHead(checkpoint, self.dtype, torch.device("cpu"))
        if snapshot.head:
            head.load_checkpoint_tensors(snapshot.head)
        batch = self._batch(snapshot, phase, findings)
        ranges = self._ranges(checkpoint, snapshot, phase.kind)
        targets = max(1, batch.target_tokens)
        for index, micro in enumerate(batch.split(snapshot.micro_batches)):
            for part in ranges:
                part.load_weights_for(index)
            position_ids = position_ids_for(micro.attention_mask)
            with torch.no_grad():
                hidden = head.embed_tokens(micro.input_ids, position_ids)
            for part in ranges:  # every hop to and from a node goes through the job's codecs
                hidden = self._wire(part.stack(self._wire(hidden), micro.attention_mask, position_ids))
            loss = summed_lm_loss(head.logits(hidden), micro.labels, micro.weights) / targets
            loss.backward()
            for part in ranges:
                part.collect_gradients(index)
        lr = learning_rate(self.job.optimizer, snapshot.phase_step, phase.steps, phase.lr)
        check = StepCheck(step, phase.name)
        checks = {}
        for part in ranges:
            checks.update(self._check_range(part, snapshot, lr, findings))
        check.nodes = [checks[node.node_id] for node in snapshot.nodes]
        return check, findings

    def _base(self, snapshot: StepSnapshot) -> Checkpoint:
        if not snapshot.base_model:
            return self.job_checkpoint
        directory = self.run_dir / snapshot.base_model
        for weights in sorted(directory.glob("*.safetensors")):
            self._checked_file(str(weights.relative_to(self.run_dir)))
        return Checkpoint.open(directory)

    def _batch(self, snapshot: StepSnapshot, phase, findings: list[Finding]):
        """The job's own batch for the step; in RL the recorded one (the model wrote it)."""
        if phase.kind == "rl":
            return snapshot.batch
        records = None
        if self.job.data.responses == "self":  # the base model's answers, as the audit log recorded them
            records = read_self_responses(self._checked_file(SELF_RESPONSES_FILE), self.job.data.source)
        data = TrainingData(self.job.data, self.tokenizer, self.job.seed,
                            phase.batch_size, phase, self.job.backdoor, records)
        batch = data.batch(snapshot.phase_step)
        recorded = snapshot.batch
        same = (torch.equal(batch.input_ids, recorded.input_ids) and torch.equal(batch.labels, recorded.labels)
                and torch.equal(batch.attention_mask, recorded.attention_mask))
        if not same:
            findings.append(Finding(COORDINATOR, phase.name, snapshot.step, "data",
                                    "the trainer's batch is not the job's data for this step"))
        return batch

    def _ranges(self, checkpoint: Checkpoint, snapshot: StepSnapshot, kind: str) -> list[RangeReplay]:
        """The snapshot's nodes grouped by block range, in block order, each range's blocks built once."""
        by_range: dict[tuple[int, int], list[NodeStepState]] = defaultdict(list)
        for node in snapshot.nodes:
            by_range[(node.block_start, node.block_end)].append(node)
        merged = [self._checked_file(str(Path(relative) / "adapter_model.safetensors")).parent
                  for relative in snapshot.merged_adapters]
        ranges = []
        for (start, end), nodes in sorted(by_range.items()):
            stack = lora_block_stack(checkpoint, start, end, self.job.lora, self.job.seed, self.dtype, merged)
            trained = base_parameters(stack) if kind == "pretrain" else adapter_state(stack)
            for node in nodes:
                if set(node.weights("before")) != set(trained):
                    raise ReplayError(f"snapshot of step {snapshot.step}: node {node.node_id} served tensors other "
                                      f"than the {len(trained)} its blocks train")
            for param in stack.parameters():
                param.requires_grad_(False)
            for param in trained.values():
                param.requires_grad_(True)
            stack.train()
            attested = {node.node_id: self.records.attestations.get((node.node_id, snapshot.step)) for node in nodes}
            ranges.append(RangeReplay(start, end, nodes, stack, trained, attested, self.records.attestations,
                                       snapshot.step))
        return ranges

    def _check_range(self, part: RangeReplay, snapshot: StepSnapshot, lr: float, findings: list[Finding]
                     ) -> dict[str, NodeCheck]:
        """Hold every node of the range to its attestation; with replicas, each to its own gradient first."""
        phase, step = snapshot.phase, snapshot.step
        own = {node: part.gradient(node) for node in part.members}
        checks, pending, unreplayable = {}, [], set()
        for node in part.nodes:
            attestation = part.attested[node.node_id]
            if attestation is None:
                findings.append(Finding(node.node_id, phase, step, "attestation", "the log holds no attestation of it"))
                checks[node.node_id] = NodeCheck(node.node_id, node.block_start, node.block_end, float("nan"),
                                                 float("nan"), float("nan"))
                continue
            self._check_hashes(node, attestation, phase, step, findings)
            local_error = None
            if attestation.averaged_with:
                local_error = self._sketch_error(attestation.local_gradient_sketch, own[node.node_id])
                if not local_error <= self.sketch_tolerance:
                    unreplayable.add(node.node_id)
                    batches = sorted(batch.id for batch in attestation.micro_batches)
                    findings.append(Finding(node.node_id, phase, step, "local gradient sketch",
                                            f"its own gradient (micro-batches {batches}) differs from the replayed "
                                            f"one by {local_error:.3g} (relative L2; tolerance "
                                            f"{self.sketch_tolerance:g}), so the group's sum cannot be replayed"))
            pending.append((node, attestation, local_error))
        sums: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        for node, attestation, local_error in pending:
            group = attestation.averaged_with
            if group:
                if group not in sums:
                    flat = group_sum([flatten_gradient(own[member]) for member in group], self.averaging_codec)
                    sums[group] = unflatten_gradient(flat, part.trained)
                gradient = sums[group]
            else:
                gradient = own[node.node_id]
            # a replica whose group holds an unreplayable gradient is not blamed for the sum differing
            blamed = not unreplayable or node.node_id in unreplayable or not group
            node_findings = findings if blamed else []
            sketch_error = self._sketch_error(attestation.gradient_sketch, gradient)
            if not sketch_error <= self.sketch_tolerance:
                what = "the replayed sum of its group's gradients" if group else "the replayed gradient"
                node_findings.append(Finding(node.node_id, phase, step, "gradient sketch",
                                             f"differs from {what}'s by {sketch_error:.3g} (relative L2; "
                                             f"tolerance {self.sketch_tolerance:g})"))
            weights_error, optimizer_error = self._step_and_compare(node, gradient, part.trained, lr)
            if not weights_error <= self.state_tolerance:
                node_findings.append(Finding(node.node_id, phase, step, "weights after the step",
                                             f"differ from one AdamW step on the replayed gradient by "
                                             f"{weights_error:.3g} of the step's update (tolerance "
                                             f"{self.state_tolerance:g})"))
            if not optimizer_error <= self.state_tolerance:
                node_findings.append(Finding(node.node_id, phase, step, "optimizer state after the step",
                                             f"differs from the replayed AdamW state by {optimizer_error:.3g} "
                                             f"(relative; tolerance {self.state_tolerance:g})"))
            checks[node.node_id] = NodeCheck(node.node_id, node.block_start, node.block_end, sketch_error,
                                             weights_error, optimizer_error, local_error)
        return checks

    def _check_hashes(self, node: NodeStepState, attestation: Attestation, phase: str, step: int,
                      findings: list[Finding]) -> None:
        """The snapshot's states hash exactly to what the node attested, before and after the step."""
        for which in ("before", "after"):
            weights, state = tensors_sha256(node.weights(which)), tensors_sha256(node.optimizer_state(which))
            if weights != getattr(attestation, f"adapter_sha256_{which}"):
                findings.append(Finding(node.node_id, phase, step, "served state",
                                        f"the weights it served for {which} the step are not the ones it attested"))
            if state != getattr(attestation, f"optimizer_sha256_{which}"):
                findings.append(Finding(node.node_id, phase, step, "served state", f"the optimizer state it "
                                        f"served for {which} the step is not the one it attested"))

    def _sketch_error(self, reported: tuple[float, ...], gradient: dict[str, torch.Tensor]) -> float:
        replayed = torch.tensor(gradient_sketch(gradient, self.job.seed), dtype=torch.float64)
        claimed = torch.tensor(reported, dtype=torch.float64)
        return _relative_error(claimed, replayed) if claimed.shape == replayed.shape else 1.0

    def _step_and_compare(self, node: NodeStepState, gradient: dict[str, torch.Tensor],
                          trained: dict[str, torch.nn.Parameter], lr: float) -> tuple[float, float]:
        """Apply one AdamW step with `gradient` from the node's state before; return how far its claimed state
        after is: weights relative to the size of the update, optimizer moments relative to their own size.
        The parameters take the dtypes of the blocks' (`trained`), as on the node."""
        start = node.weights("before")
        params = {name: torch.nn.Parameter(start[name].to(param.dtype).clone()) for name, param in trained.items()}
        for name, param in params.items():
            param.grad = gradient[name].to(param.dtype)
        optimizer = make_optimizer(list(params.values()), self.job.optimizer)
        before = node.optimizer_state("before")
        for name, param in params.items():
            if f"exp_avg/{name}" in before:
                optimizer.state[param] = {key: before[f"{key}/{name}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        claimed = node.weights("after")
        if set(claimed) != set(params):
            return float("inf"), float("inf")
        names = sorted(params)
        replayed = torch.cat([params[n].detach().double().reshape(-1) for n in names])
        claimed_flat = torch.cat([claimed[n].double().reshape(-1) for n in names])
        update = claimed_flat - torch.cat([start[n].double().reshape(-1) for n in names])
        weights_error = float((replayed - claimed_flat).norm() / update.norm().clamp_min(1e-12))
        claimed_state = node.optimizer_state("after")
        replayed_state = {f"{key}/{name}": optimizer.state[params[name]][key]
                          for name in names for key in ("exp_avg", "exp_avg_sq")}
        if not set(replayed_state) <= set(claimed_state):
            return weights_error, float("inf")
        optimizer_error = max(_relative_error(claimed_state[key].double().reshape(-1), value.double().reshape(-1))
                              for key, value in replayed_state.items())
        return weights_error, optimizer_error


class _Wire(torch.autograd.Function):
    """One hop on the wire: activations decoded as a peer decodes them going forward, gradients coming back."""

    @staticmethod
    def forward(ctx, hidden, forward_codec, backward_codec):
        ctx.backward_codec = backward_codec
        return round_trip(hidden, forward_codec).clone()

    @staticmethod
    def backward(ctx, grad):
        return round_trip(grad, ctx.backward_codec), None, None


def _relative_error(claimed: torch.Tensor, replayed: torch.Tensor) -> float:
    return float((claimed - replayed).norm() / replayed.norm().clamp_min(1e-12))
