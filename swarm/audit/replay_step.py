"""One snapshotted step re-executed on this machine (swarm.audit.replay), each node held to what it attested.

The whole model runs from the snapshot's weights on the job's own data, through the job's wire codecs; each
block range is checked for exact state hashes, the gradient sketch (and with replicas, each replica's own
gradient and the group's sum), and one AdamW step against the node's claimed state after it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from swarm.audit.attestation import Attestation
from swarm.audit.replay_range import RangeReplay
from swarm.audit.replay_report import COORDINATOR, Finding, NodeCheck, ReplayError, StepCheck
from swarm.audit.sketch import gradient_sketch
from swarm.audit.snapshot import NodeStepState, StepSnapshot, read_snapshot
from swarm.config import Job
from swarm.data.batches import TrainingData
from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
from swarm.data.tokenizer import load_tokenizer
from swarm.lora import adapter_state, base_parameters, lora_block_stack
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import DTYPES, Checkpoint, resolve_model, tensors_sha256
from swarm.p2p.codecs import CODECS, codec_type, round_trip
from swarm.p2p.replica_sum import flatten_gradient, group_sum, unflatten_gradient
from swarm.training import learning_rate, make_optimizer, position_ids_for, summed_lm_loss

if TYPE_CHECKING:
    from swarm.audit.replay import LogRecords


class StepReplayer:
    """Replays snapshotted steps of one run; built once per run (the model, tokenizer and codecs are shared)."""

    def __init__(self, run_dir: Path, job: Job, records: LogRecords, cache_dir: Path | None,
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
