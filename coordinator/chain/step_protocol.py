"""A training step over the chain: micro-batches forward and backward through one replica per range, then
every replica applies the step. A replica that fails mid-step is dropped and its share redone on another
(the trainer keeps each micro-batch's inputs and gradients at ranges with more than one replica)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from coordinator.chain.attestations import AttestationLedger
from coordinator.chain.groups import ReplicaGroups
from coordinator.chain.routing import Router
from coordinator.chain.schedule import StepSchedule
from coordinator.chain.stage import RemoteStage
from coordinator.chain.state import ChainState
from coordinator.chain.transport import CALL_ATTEMPTS, Transport, hidden_reply
from swarm.config import CompressionSpec
from swarm.errors import RemoteBlockError, SwarmConnectionError, SwarmError
from swarm.p2p.codecs import codec_type
from swarm.p2p.rpc import BACKWARD, FORWARD, STEP
from swarm.proto.blocks_pb2 import CallMeta, CallResult

logger = logging.getLogger("swarm.coordinator")


@dataclass
class MicroRecord:
    """A training micro-batch's trip: the replica per range, each range's input and the gradient it got."""

    route: list[RemoteStage]
    inputs: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    input_grad: bool = True  # whether the trainer uses the gradient w.r.t. the first range's input

    def unused_input_grad(self, index: int) -> bool:
        """Whether range `index` is told the gradient w.r.t. its input is unused."""
        return index == 0 and not self.input_grad


class StepProtocol:
    def __init__(self, transport: Transport, groups: ReplicaGroups, router: Router, ledger: AttestationLedger,
                 state: ChainState, compression: CompressionSpec):
        self.transport, self.groups, self.router, self.ledger, self.state = transport, groups, router, ledger, state
        self.compression = compression
        self.forward_codec = codec_type(compression.forward)
        self.backward_codec = codec_type(compression.backward)
        # step -> micro-batch -> what the trainer sent each range, so a dropped replica's share can be recomputed
        self.records: dict[int, dict[int, MicroRecord]] = {}
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Drop every kept micro-batch (the chain goes back to a checkpoint: later steps are redone)."""
        with self._lock:
            self.records.clear()

    def forward(self, hidden, attention_mask, position_ids, step: int, micro_batch: int, train: bool,
                phase: str = "train", route: list[RemoteStage] | None = None, input_grad: bool = True
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run hidden states through every range, over `route` (one replica per range; updated in place when
        a replica fails and another takes the micro-batch); also return each range's input (for re-sending).
        Without a route, the micro-batch takes a fresh one (and releases it at the end). Without `input_grad`
        (training, when the trainer's embeddings do not train), the first range neither keeps the graph to its
        input nor computes that gradient, and the backward returns an empty tensor."""
        own_route = route is None
        route = self.router.route() if own_route else route
        stage_inputs = []
        if train:
            record = MicroRecord(route, stage_inputs, [None] * len(route), attention_mask, position_ids, input_grad)
            with self._lock:
                self.records.setdefault(step, {})[micro_batch] = record
        try:
            for index in range(len(route)):
                stage_inputs.append(hidden)
                hidden = self.forward_one(index, route, hidden, attention_mask, position_ids, step, micro_batch,
                                          train, phase, train and index == 0 and not input_grad)
        finally:
            if own_route:
                self.router.release(route)
        return hidden, stage_inputs

    def forward_one(self, index: int, route: list[RemoteStage], hidden, attention_mask, position_ids, step: int,
                    micro_batch: int, train: bool, phase: str, unused_input_grad: bool = False) -> torch.Tensor:
        while True:
            stage = route[index]
            if train:
                self.ledger.expect(stage, step, micro_batch, hidden, attention_mask)
            meta = self.transport.meta(stage, phase=phase, step=step, micro_batch=micro_batch, train=train,
                                       reply_codec=self.compression.forward, input_grad_unused=unused_input_grad)
            started = time.perf_counter()
            try:
                _, outputs = self.transport.call(stage, FORWARD, meta, [hidden, attention_mask, position_ids],
                                                 self.forward_codec)
                output = hidden_reply(stage, FORWARD, outputs, hidden.shape)  # blocks keep the hidden states' shape
            except SwarmConnectionError as error:
                route[index] = self._replace(index, stage, error, micro_batch, step)
                continue
            except RemoteBlockError as error:
                if index > 0 and not bool(torch.isfinite(hidden).all()):  # checked only here: off the happy path
                    raise RemoteBlockError(f"{route[index - 1]} answered forward with hidden states that contain NaN "
                                           f"or inf, which {stage} refused: training diverged, or that node is faulty "
                                           f"({error})") from None
                raise
            self.router.measured(stage, time.perf_counter() - started)
            return output

    def backward(self, grad, stage_inputs, attention_mask, position_ids, step: int, micro_batch: int,
                 phase: str = "train", route: list[RemoteStage] | None = None,
                 schedule: StepSchedule | None = None) -> torch.Tensor:
        """Gradients back through the replicas the micro-batch's forward took (they hold its activations);
        when one of them fails, another replica of its range recomputes from the inputs. With a `schedule`,
        each range takes the step's micro-batches' backward calls in micro-batch order."""
        route = route or [group[0] for group in self.groups.groups]
        record = self.records.get(step, {}).get(micro_batch)
        for index in reversed(range(len(route))):
            if record is not None:
                record.grads[index] = grad
            with schedule.backward_turn(index, micro_batch) if schedule else contextlib.nullcontext():
                grad = self._backward_at(index, route, grad, stage_inputs, attention_mask, position_ids, step,
                                         micro_batch, phase, record is not None and record.unused_input_grad(index))
        if record is not None:
            for index, group in enumerate(self.groups.groups):
                if len(group) < 2:  # no other replica could take this share over: nothing to keep for it
                    record.inputs[index] = record.grads[index] = None
        return grad

    def _backward_at(self, index: int, route: list[RemoteStage], grad, stage_inputs, attention_mask, position_ids,
                     step: int, micro_batch: int, phase: str, unused_input_grad: bool) -> torch.Tensor:
        while True:
            stage = route[index]
            try:
                return self.backward_one(stage, grad, stage_inputs[index], attention_mask, position_ids, step,
                                         micro_batch, phase, unused_input_grad)
            except SwarmConnectionError as error:
                route[index] = self._replace(index, stage, error, micro_batch, step)
                self.ledger.expect(route[index], step, micro_batch, stage_inputs[index], attention_mask)

    def backward_one(self, stage: RemoteStage, grad, hidden, attention_mask, position_ids, step: int,
                     micro_batch: int, phase: str, unused_input_grad: bool = False) -> torch.Tensor:
        meta = self.transport.meta(stage, phase=phase, step=step, micro_batch=micro_batch,
                                   reply_codec=self.compression.backward, input_grad_unused=unused_input_grad)
        result, outputs = self.transport.call(stage, BACKWARD, meta, [grad], self.backward_codec)
        if result.status == CallResult.MISSING_ACTIVATIONS:
            meta.includes_inputs = True
            result, outputs = self.transport.call(stage, BACKWARD, meta, [grad, hidden, attention_mask, position_ids],
                                                  [self.backward_codec] + [self.forward_codec] * 3)
        return hidden_reply(stage, BACKWARD, outputs, (0,) if unused_input_grad else hidden.shape)

    def _replace(self, index: int, stage: RemoteStage, error: Exception, micro_batch: int, step: int) -> RemoteStage:
        """`stage` failed a call: drop it from the chain and pick another replica of its range."""
        replacement = self.router.replace(index, stage, str(error))
        logger.warning("micro-batch %d of step %d goes to %s instead", micro_batch, step, replacement)
        return replacement

    def apply_step(self, step: int, learning_rate: float, phase: str = "train") -> None:
        """Every replica applies the step (all at once: nodes step and attest independently; the replicas of a
        range first sum their gradients among themselves); with an audit log, each attestation is checked,
        then appended, range by range. Replicas of a range must attest identical weights after the step.

        A replica that failed during the step is out: the micro-batches it had taken at its range are
        recomputed on a replica left (the trainer kept their inputs and gradients), and its range steps without
        it. If it failed while its group was summing, the group retries without it; a replica left behind
        while the others applied the step copies one of them."""
        try:
            pending = list(range(len(self.groups.ranges)))
            for _ in range(CALL_ATTEMPTS):
                self._recompute_dropped(step, phase)
                # every range's calls go out at once (nodes step independently), then are checked range by range
                calls = [(index, *self._submit_step(index, step, learning_rate, phase)) for index in pending]
                pending = [index for index, group, submitted in calls
                           if not self._collect_step(index, group, submitted, step, phase)]
                if not pending:
                    return
            raise SwarmError(f"step {step}: blocks {', '.join(self.groups.name(i) for i in pending)} could not "
                             f"apply it after {CALL_ATTEMPTS} attempts")
        finally:
            self.ledger.forget_through(step)
            with self._lock:
                self.records = {key: value for key, value in self.records.items() if key > step}

    def _recompute_dropped(self, step: int, phase: str) -> None:
        """Micro-batches a dropped replica had taken: their backward at its range again, on a replica left."""
        for micro_batch, record in sorted(self.records.get(step, {}).items()):
            for index, stage in enumerate(record.route):
                if stage in self.groups.groups[index] or record.grads[index] is None:
                    continue
                replacement = self.router.pick(index)
                self.router.release([replacement])  # recomputed right here, not in flight
                self.ledger.expect(replacement, step, micro_batch, record.inputs[index], record.attention_mask)
                self.backward_one(replacement, record.grads[index], record.inputs[index], record.attention_mask,
                                  record.position_ids, step, micro_batch, phase, record.unused_input_grad(index))
                record.route[index] = replacement
                logger.info("micro-batch %d of step %d recomputed on %s", micro_batch, step, replacement)

    def _submit_step(self, index: int, step: int, learning_rate: float, phase: str
                     ) -> tuple[list[RemoteStage], list[Future]]:
        """One range's step calls to its live replicas, under way."""
        group = self.groups.serving(index)
        return group, [self.transport.submit(stage, STEP, self._step_meta(group, stage, phase, step, learning_rate))
                       for stage in group]

    def _collect_step(self, index: int, group: list[RemoteStage], calls: list[Future], step: int, phase: str
                      ) -> bool:
        """The answers of one range's step calls, checked and recorded; False when it has to be tried again."""
        applied, refused = [], []
        for stage, call in zip(group, calls):
            try:
                applied.append((stage, call.result()[0]))
            except SwarmConnectionError as error:
                self.groups.drop(stage, str(error))
            except RemoteBlockError as error:
                refused.append((stage, error))
        if not applied:
            if len(self.groups.groups[index]) == len(group):
                raise refused[0][1]  # nobody died: the refusal stands
            return False  # a replica died while the group was summing: again without it
        self.ledger.record_step(group, applied, phase, step)
        for stage, error in refused:  # left behind while the others applied: it copies one of them
            logger.warning("%s missed step %d (%s); it copies a replica that applied it", stage, step, error)
            self.groups.remove(stage)
            self.state.add_replica(stage, phase, self.state.phase_kind, step, source=applied[0][0])
        return True

    def _step_meta(self, group: list[RemoteStage], stage: RemoteStage, phase: str, step: int,
                   learning_rate: float) -> CallMeta:
        meta = self.transport.meta(stage, phase=phase, step=step, learning_rate=learning_rate)
        if len(group) > 1:
            meta.replica_peers.extend(s.peer_id.to_base58() for s in group)
            meta.replica_nodes.extend(s.node_id for s in group)
            meta.averaging_codec = self.compression.averaging
            meta.averaging_timeout_s = self.transport.peer_wait_s
        return meta
