"""The trainer's view of the swarm: a chain of block ranges, each served by one or more replicas (peers).

Every call carries the job, step and micro-batch ids; tensors go through hivemind P2P streams. A stage that
lost a micro-batch's activations gets its inputs re-sent and recomputes.

With replicas, each micro-batch takes one replica per range (`route`), picked by measured latency and the
calls it already has in flight, so a slow replica gets fewer micro-batches; a micro-batch whose forward call
fails is sent to another replica of that range. At the step, the replicas of a range sum their gradients
among themselves (node.replica_reduce) and all apply the same update.

With an audit log, every step reply's attestation is checked before it is appended: signed by the node's
registered key, for the job, phase, step and block range asked, and naming exactly the micro-batch inputs
(by hash) and tokens this trainer sent that node for the step. A bad one fails the run, naming the node.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import runtime_pb2

from swarm.audit.attestation import Attestation, SignedAttestation, check_attestation
from swarm.audit.errors import AttestationError
from swarm.audit.log import AuditLog
from swarm.audit.sketch import tensor_sha256
from swarm.config import CompressionSpec
from swarm.errors import RemoteBlockError, SwarmConnectionError, SwarmError
from swarm.p2p.codecs import CODECS, codec_type, round_trip
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.tensors import (ADAPTER, ADMIT, BACKWARD, FORWARD, LOAD_STATE, PHASE, REPLICA_STATE, RESTORE, STEP,
                               STEP_STATE, SYNC, WEIGHTS, aiter_list, from_messages, to_messages)
from swarm.proto.blocks_pb2 import CallMeta, CallResult

logger = logging.getLogger("swarm.coordinator")

CALL_ATTEMPTS = 3
LATENCY_SMOOTHING = 0.3  # weight of the newest measurement in a replica's latency average
FAILURE_BAN_S = 30.0  # a replica whose call failed gets no new micro-batches for this long
PROBE_AFTER = 8  # a replica passed over this many times in a row gets the next micro-batch, to re-measure it


class RangeLostError(SwarmError):
    """Every replica of a block range is gone: the chain cannot go on until a node takes the range over
    (from a step checkpoint: coordinator.step_checkpoint)."""

    def __init__(self, start: int, end: int, detail: str = ""):
        super().__init__(f"blocks {start}..{end - 1} lost their last replica" + (f" ({detail})" if detail else ""))
        self.start, self.end = start, end


@dataclass
class RemoteStage:
    """One peer serving one block range (a replica of that range)."""

    peer_id: PeerID
    start: int
    end: int
    node_id: str
    bytes_sent: int = 0
    bytes_received: int = 0
    # stream ("forward", "backward", "step", "average", ...) -> [bytes sent, bytes received]; "average" is
    # what the node reports it exchanged with its replicas, the rest is counted here on the wire
    stream_bytes: dict[str, list[int]] = field(default_factory=dict)
    latency_s: float | None = None  # smoothed seconds per forward call
    in_flight: int = 0  # micro-batches routed here whose backward has not returned
    banned_until: float = 0.0
    micro_batches: int = 0  # routed here so far
    passed_over: int = 0  # micro-batches its range routed elsewhere since it last got one
    forward_calls: int = 0

    def __str__(self) -> str:
        return f"node {self.node_id} (blocks {self.start}..{self.end - 1})"


@dataclass
class _MicroRecord:
    """A training micro-batch's trip: the replica per range, each range's input and the gradient it got."""

    route: list[RemoteStage]
    inputs: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def _count(stage: RemoteStage, method: str, sent: int, received: int) -> None:
    counts = stage.stream_bytes.setdefault(method.rsplit(".", 1)[-1], [0, 0])
    counts[0] += sent
    counts[1] += received


def group_stages(stages: list[RemoteStage]) -> list[list[RemoteStage]]:
    """Replicas grouped by range, ranges in block order; replicas keep their given order."""
    groups: dict[tuple[int, int], list[RemoteStage]] = {}
    for stage in stages:
        groups.setdefault((stage.start, stage.end), []).append(stage)
    return [groups[key] for key in sorted(groups)]


class RemoteChain:
    def __init__(self, p2p: P2P, loop: LoopThread, stages: list[RemoteStage], job_id: str, timeout_s: float,
                 audit: AuditLog | None = None, compression: CompressionSpec | None = None):
        self.p2p, self.loop, self.job_id, self.timeout_s = p2p, loop, job_id, timeout_s
        self.groups = group_stages(stages)
        self._ranges = [(group[0].start, group[0].end) for group in self.groups]
        self._last_drop: dict[tuple[int, int], str] = {}  # range -> why its last dropped replica was dropped
        self.stages = [stage for group in self.groups for stage in group]  # every replica, range by range
        self.audit = audit
        self.compression = compression or CompressionSpec()
        self.forward_codec = codec_type(self.compression.forward)
        self.backward_codec = codec_type(self.compression.backward)
        self._workers = max(1, len(self.stages))
        self._parallel = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="chain-step")
        # (node id, step) -> micro-batch -> (sha256 of the inputs sent, tokens): what attestations must say
        self._sent: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}
        self._lock = threading.Lock()  # routing state and `_sent`, shared by concurrent micro-batches
        # step -> micro-batch -> what the trainer sent each range, so a dropped replica's share can be recomputed
        self._records: dict[int, dict[int, _MicroRecord]] = {}
        self.dropped: list[RemoteStage] = []  # replicas dropped during the current step
        self.on_drop = None  # called with (stage, reason) when a replica leaves the chain
        self._phase_kind = "sft"

    @property
    def replicas(self) -> int:
        """The most replicas any range has: how many micro-batches are worth running at once."""
        return max(len(group) for group in self.groups)

    def route(self) -> list[RemoteStage]:
        """One replica per range for a micro-batch, each the one expected to answer first (`_pick`)."""
        with self._lock:
            return [self._pick(group, set()) for group in self.groups]

    def _pick(self, group: list[RemoteStage], exclude: set[str]) -> RemoteStage:
        """Smoothed latency times (calls in flight + 1), lowest first; an unmeasured replica counts as the
        fastest measured one, and one passed over PROBE_AFTER times in a row goes first (a replica measured
        slow once would otherwise never be measured again); replicas that failed recently only when nothing
        else is left. Holds the lock."""
        now = time.monotonic()
        candidates = [s for s in group if s.node_id not in exclude and s.banned_until <= now] or \
            [s for s in group if s.node_id not in exclude] or group
        measured = [s.latency_s for s in candidates if s.latency_s is not None]
        default = min(measured) if measured else 1.0
        starved = [s for s in candidates if s.passed_over >= PROBE_AFTER]
        chosen = min(starved or candidates,
                     key=lambda s: ((s.in_flight + 1) * (s.latency_s or default), s.micro_batches))
        for stage in group:
            stage.passed_over = 0 if stage is chosen else stage.passed_over + 1
        chosen.in_flight += 1
        chosen.micro_batches += 1
        return chosen

    def release(self, route: list[RemoteStage]) -> None:
        """The micro-batch routed over `route` is done (or abandoned)."""
        with self._lock:
            for stage in route:
                stage.in_flight = max(0, stage.in_flight - 1)

    def _measured(self, stage: RemoteStage, seconds: float) -> None:
        with self._lock:
            stage.forward_calls += 1
            if stage.forward_calls == 1:
                return  # the first call also opens the connection: not what later calls will take
            stage.latency_s = seconds if stage.latency_s is None else \
                (1 - LATENCY_SMOOTHING) * stage.latency_s + LATENCY_SMOOTHING * seconds

    def _meta(self, stage: RemoteStage, **fields) -> CallMeta:
        return CallMeta(job_id=self.job_id, block_start=stage.start, block_end=stage.end, **fields)

    async def _call(self, stage: RemoteStage, method: str, meta: CallMeta, tensors, codecs) -> tuple[CallResult, list[torch.Tensor]]:
        """One attempt. Its bytes count towards the method's stream (`stream_bytes`) once it is answered; a
        lost attempt's (to be asked again) go to the `retried` stream, so per-stream figures are the traffic a
        call takes and retries show apart."""
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), tensors, codecs)
        sent = sum(message.ByteSize() for message in requests)
        stage.bytes_sent += sent
        received = 0
        try:
            responses = await self.p2p.iterate_protobuf_handler(stage.peer_id, method, aiter_list(requests),
                                                                runtime_pb2.ExpertResponse)
            metadata, outputs, received = await from_messages(responses)
            stage.bytes_received += received
            result = CallResult.FromString(metadata)
            expected = len(result.names) if result.names else (
                1 if result.status == CallResult.OK and method in (FORWARD, BACKWARD) else len(outputs))
            if len(outputs) != expected:
                # a stream cut between two tensors decodes cleanly but short: a lost reply, to be asked again
                raise ConnectionError(f"the reply should hold {expected} tensors but {len(outputs)} arrived")
        except (ConnectionError, asyncio.IncompleteReadError, P2PDaemonError):
            retried = stage.stream_bytes.setdefault("retried", [0, 0])
            retried[0] += sent
            retried[1] += received
            raise
        except BaseException:  # refused or timed out: the traffic still belongs to the method
            _count(stage, method, sent, received)
            raise
        _count(stage, method, sent, received)
        return result, outputs

    def call(self, stage: RemoteStage, method: str, meta: CallMeta, tensors=(), codecs=CODECS["none"]
             ) -> tuple[CallResult, list[torch.Tensor]]:
        """One call, retried when the connection drops without a reply. Every method is safe to repeat:
        nodes answer a repeated backward from its kept result and apply a step or phase change once."""
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                result, outputs = self.loop.run(self._call(stage, method, meta, list(tensors), codecs),
                                                timeout=self.timeout_s)
                break
            except (TimeoutError, asyncio.TimeoutError):
                raise SwarmConnectionError(f"{stage} did not answer {method} within {self.timeout_s:.0f} s") from None
            except (ConnectionError, asyncio.IncompleteReadError, P2PDaemonError) as error:
                if attempt == CALL_ATTEMPTS:
                    raise SwarmConnectionError(f"{stage} failed during {method}: {error}") from None
                logger.warning("%s dropped %s without a reply (%s); retrying (%d/%d)", stage, method,
                               error or type(error).__name__, attempt, CALL_ATTEMPTS)
                time.sleep(0.2 * attempt)
            except Exception as error:
                raise SwarmConnectionError(f"{stage} failed during {method}: {type(error).__name__}: {error}") from None
        if result.status == CallResult.ERROR:
            raise RemoteBlockError(f"{stage} refused {method}: {result.error}")
        return result, outputs

    def forward(self, hidden, attention_mask, position_ids, step: int, micro_batch: int, train: bool,
                phase: str = "train", route: list[RemoteStage] | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run hidden states through every range, over `route` (one replica per range; updated in place when
        a replica fails and another takes the micro-batch); also return each range's input (for re-sending).
        Without a route, the micro-batch takes a fresh one (and releases it at the end)."""
        own_route = route is None
        route = self.route() if own_route else route
        stage_inputs = []
        if train:
            record = _MicroRecord(route, stage_inputs, [None] * len(self.groups), attention_mask, position_ids)
            with self._lock:
                self._records.setdefault(step, {})[micro_batch] = record
        try:
            for index in range(len(self.groups)):
                stage_inputs.append(hidden)
                hidden = self._forward_one(index, route, hidden, attention_mask, position_ids, step, micro_batch,
                                           train, phase)
        finally:
            if own_route:
                self.release(route)
        return hidden, stage_inputs

    def _forward_one(self, index: int, route: list[RemoteStage], hidden, attention_mask, position_ids, step: int,
                     micro_batch: int, train: bool, phase: str) -> torch.Tensor:
        while True:
            stage = route[index]
            if train:
                self._expect(stage, step, micro_batch, hidden, attention_mask)
            meta = self._meta(stage, phase=phase, step=step, micro_batch=micro_batch, train=train,
                              reply_codec=self.compression.forward)
            started = time.perf_counter()
            try:
                _, outputs = self.call(stage, FORWARD, meta, [hidden, attention_mask, position_ids],
                                       self.forward_codec)
            except SwarmConnectionError as error:
                route[index] = self._replace(index, stage, error, micro_batch, step)
                continue
            self._measured(stage, time.perf_counter() - started)
            return outputs[0]

    def _expect(self, stage: RemoteStage, step: int, micro_batch: int, hidden, attention_mask) -> None:
        """Note what `stage`'s attestation of `step` must list for this micro-batch (hashed as decoded)."""
        if self.audit is None:
            return
        received = round_trip(hidden, self.forward_codec)
        with self._lock:
            self._sent.setdefault((stage.node_id, step), {})[micro_batch] = (tensor_sha256(received),
                                                                             int(attention_mask.sum()))

    def _replace(self, index: int, stage: RemoteStage, error: Exception, micro_batch: int, step: int) -> RemoteStage:
        """`stage` failed a call: drop it from the chain and pick another replica of its range."""
        self.drop(stage, str(error))
        with self._lock:
            group = self.groups[index]
            if not group:
                raise self.lost(index)
            replacement = self._pick(group, set())
        logger.warning("micro-batch %d of step %d goes to %s instead", micro_batch, step, replacement)
        return replacement

    def drop(self, stage: RemoteStage, reason: str) -> None:
        """Take a replica out of the chain for good (it died, left or failed a call): it gets no more calls,
        its part of the current step is recomputed on the replicas left, and it is not in the step's sum."""
        with self._lock:
            for group in self.groups:
                if stage in group:
                    group.remove(stage)
                    self._last_drop[(stage.start, stage.end)] = \
                        reason if reason.startswith(str(stage)) else f"{stage}: {reason}"
                    self.dropped.append(stage)
                    self.stages = [s for g in self.groups for s in g]
                    logger.warning("%s leaves the chain: %s", stage, reason)
                    for key in [key for key in self._sent if key[0] == stage.node_id]:
                        del self._sent[key]
                    break
            else:
                return
        if self.on_drop is not None:
            self.on_drop(stage, reason)

    def backward(self, grad, stage_inputs, attention_mask, position_ids, step: int, micro_batch: int,
                 phase: str = "train", route: list[RemoteStage] | None = None) -> torch.Tensor:
        """Gradients back through the replicas the micro-batch's forward took (they hold its activations);
        when one of them fails, another replica of its range recomputes from the inputs."""
        route = route or [group[0] for group in self.groups]
        record = self._records.get(step, {}).get(micro_batch)
        for index in reversed(range(len(route))):
            if record is not None:
                record.grads[index] = grad
            while True:
                stage = route[index]
                try:
                    grad = self._backward_one(stage, grad, stage_inputs[index], attention_mask, position_ids, step,
                                              micro_batch, phase)
                    break
                except SwarmConnectionError as error:
                    route[index] = self._replace(index, stage, error, micro_batch, step)
                    self._expect(route[index], step, micro_batch, stage_inputs[index], attention_mask)
        if record is not None:
            for index, group in enumerate(self.groups):
                if len(group) < 2:  # no other replica could take this share over: nothing to keep for it
                    record.inputs[index] = record.grads[index] = None
        return grad

    def _backward_one(self, stage: RemoteStage, grad, hidden, attention_mask, position_ids, step: int,
                      micro_batch: int, phase: str) -> torch.Tensor:
        meta = self._meta(stage, phase=phase, step=step, micro_batch=micro_batch, reply_codec=self.compression.backward)
        result, outputs = self.call(stage, BACKWARD, meta, [grad], self.backward_codec)
        if result.status == CallResult.MISSING_ACTIVATIONS:
            meta.includes_inputs = True
            result, outputs = self.call(stage, BACKWARD, meta, [grad, hidden, attention_mask, position_ids],
                                        [self.backward_codec] + [self.forward_codec] * 3)
        return outputs[0]

    def apply_step(self, step: int, learning_rate: float, phase: str = "train") -> None:
        """Every replica applies the step (all at once: nodes step and attest independently; the replicas of a
        range first sum their gradients among themselves); with an audit log, each attestation is checked,
        then appended, range by range. Replicas of a range must attest identical weights after the step.

        A replica that failed during the step is out: the micro-batches it had taken at its range are
        recomputed on a replica left (the trainer kept their inputs and gradients), and its range steps without
        it. If it failed while its group was summing, the group retries without it; a replica left behind
        while the others applied the step copies one of them."""
        try:
            pending = list(range(len(self.groups)))
            for _ in range(CALL_ATTEMPTS):
                self._recompute_dropped(step, phase)
                pending = [index for index in pending if not self._step_group(index, step, learning_rate, phase)]
                if not pending:
                    return
            raise SwarmError(f"step {step}: blocks {', '.join(self._range(i) for i in pending)} could not apply it "
                             f"after {CALL_ATTEMPTS} attempts")
        finally:
            with self._lock:
                self._sent = {key: value for key, value in self._sent.items() if key[1] > step}
                self._records = {key: value for key, value in self._records.items() if key > step}
                self.dropped.clear()

    def lost(self, index: int) -> RangeLostError:
        """The error for range `index` having no replica left, naming why the last one was dropped."""
        start, end = self._ranges[index]
        return RangeLostError(start, end, self._last_drop.get((start, end), ""))

    def _range(self, index: int) -> str:
        start, end = self._ranges[index]
        return f"{start}..{end - 1}"

    def _recompute_dropped(self, step: int, phase: str) -> None:
        """Micro-batches a dropped replica had taken: their backward at its range again, on a replica left."""
        for micro_batch, record in sorted(self._records.get(step, {}).items()):
            for index, stage in enumerate(record.route):
                if stage in self.groups[index] or record.grads[index] is None:
                    continue
                with self._lock:
                    if not self.groups[index]:
                        raise self.lost(index)
                    replacement = self._pick(self.groups[index], set())
                    replacement.in_flight -= 1
                self._expect(replacement, step, micro_batch, record.inputs[index], record.attention_mask)
                self._backward_one(replacement, record.grads[index], record.inputs[index], record.attention_mask,
                                   record.position_ids, step, micro_batch, phase)
                record.route[index] = replacement
                logger.info("micro-batch %d of step %d recomputed on %s", micro_batch, step, replacement)

    def _step_group(self, index: int, step: int, learning_rate: float, phase: str) -> bool:
        """One range's step on its live replicas; False when it has to be tried again."""
        group = list(self.groups[index])
        if not group:
            raise self.lost(index)
        calls = [self._parallel.submit(self.call, stage, STEP, self._step_meta(group, stage, phase, step, learning_rate))
                 for stage in group]
        applied, refused = [], []
        for stage, call in zip(group, calls):
            try:
                applied.append((stage, call.result()[0]))
            except SwarmConnectionError as error:
                self.drop(stage, str(error))
            except RemoteBlockError as error:
                refused.append((stage, error))
        if not applied:
            if len(self.groups[index]) == len(group):
                raise refused[0][1]  # nobody died: the refusal stands
            return False  # a replica died while the group was summing: again without it
        self._record_step(group, applied, phase, step)
        for stage, error in refused:  # left behind while the others applied: it copies one of them
            logger.warning("%s missed step %d (%s); it copies a replica that applied it", stage, step, error)
            self.groups[index].remove(stage)
            self.add_replica(stage, phase, self._phase_kind, step, source=applied[0][0])
        return True

    def _record_step(self, group: list[RemoteStage], applied: list, phase: str, step: int) -> None:
        names = [s.node_id for s in group] if len(group) > 1 else []
        after = {}
        for stage, result in applied:
            counts = stage.stream_bytes.setdefault("average", [0, 0])
            counts[0] += result.averaging_bytes_sent
            counts[1] += result.averaging_bytes_received
            if self.audit is None:
                continue
            signed = SignedAttestation(result.attestation, result.signature)
            try:
                attestation = self._check(stage, signed, phase, step, self._sent.pop((stage.node_id, step), {}), names)
                self.audit.append_attestation(signed)
            except AttestationError as error:
                raise AttestationError(f"{stage} sent a bad attestation for step {step}: {error}") from None
            after[stage.node_id] = (attestation.adapter_sha256_after, attestation.optimizer_sha256_after)
        if len(set(after.values())) > 1:
            raise AttestationError(f"the replicas of blocks {group[0].start}..{group[0].end - 1} attest different "
                                   f"weights or optimizer state after step {step}: "
                                   + ", ".join(f"{n} {w[:12]}/{o[:12]}" for n, (w, o) in after.items()))

    def _step_meta(self, group: list[RemoteStage], stage: RemoteStage, phase: str, step: int,
                   learning_rate: float) -> CallMeta:
        meta = self._meta(stage, phase=phase, step=step, learning_rate=learning_rate)
        if len(group) > 1:
            meta.replica_peers.extend(s.peer_id.to_base58() for s in group)
            meta.replica_nodes.extend(s.node_id for s in group)
            meta.averaging_codec = self.compression.averaging
            meta.averaging_timeout_s = self.timeout_s
        return meta

    def _check(self, stage: RemoteStage, signed: SignedAttestation, phase: str, step: int,
               sent: dict[int, tuple[str, int]], group: list[str]) -> Attestation:
        if not signed.payload:
            raise AttestationError("the step reply carries no attestation")
        key = self.audit.node_keys().get(stage.node_id)
        if key is None:
            raise AttestationError("the node's key was never registered in the audit log")
        attestation = check_attestation(signed, key, job_id=self.job_id, phase=phase, step=step,
                                        block_start=stage.start, block_end=stage.end)
        inputs = {batch.id: batch.input_sha256 for batch in attestation.micro_batches}
        if inputs != {micro: digest for micro, (digest, _) in sent.items()}:
            raise AttestationError(f"it lists micro-batches {sorted(inputs)} with input hashes other than the "
                                   f"{len(sent)} this trainer sent")  # fmt: skip
        tokens = sum(count for _, count in sent.values())
        if attestation.tokens != tokens:
            raise AttestationError(f"it claims {attestation.tokens} tokens; this trainer sent {tokens}")
        if list(attestation.averaged_with) != group:
            raise AttestationError(f"it says it summed gradients with {list(attestation.averaged_with)}, "
                                   f"not the replica group {group}")
        return attestation

    def add_replica(self, stage: RemoteStage, phase: str, kind: str, last_step: int,
                    source: RemoteStage | None = None) -> RemoteStage:
        """Make `stage` (a node that loaded its blocks mid-job, or a replica left behind) a replica of its
        range, between steps: a serving replica (`source`, or the fastest) admits it, it fetches that
        replica's state directly, and both must then hash to the same weights and AdamW state (logged as a
        `sync` event). Returns the source."""
        group = next((g for g in self.groups if g and (g[0].start, g[0].end) == (stage.start, stage.end)), None)
        if group is None:
            raise SwarmError(f"{stage}: no serving replica of its range to copy")
        source = source or min(group, key=lambda s: (s.banned_until, s.latency_s or 0.0))
        admitted, _ = self.call(source, ADMIT, self._meta(source, replica_peers=[stage.peer_id.to_base58()]))
        synced, _ = self.call(stage, SYNC, self._meta(stage, phase=phase, phase_kind=kind, step=last_step,
                                                      replica_peers=[source.peer_id.to_base58()],
                                                      averaging_timeout_s=self.timeout_s))
        if (synced.weights_sha256, synced.optimizer_sha256) != (admitted.weights_sha256, admitted.optimizer_sha256):
            raise RemoteBlockError(f"{stage} copied {source} but hashes to other weights or optimizer state")
        if self.audit is not None:
            self.audit.append_event("sync", node_id=stage.node_id, source_node=source.node_id, step=last_step,
                                    phase=phase, weights_sha256=synced.weights_sha256,
                                    optimizer_sha256=synced.optimizer_sha256)
        self.adopt(stage)
        return source

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every range, in block order, whether or not it has a replica left."""
        return list(self._ranges)

    def adopt(self, stage: RemoteStage) -> None:
        """Put `stage` into its range's group: a replica that copied another (`add_replica`), or a node that
        took over a range with no replica left (it holds no trained state yet; `load_state` gives it a step
        checkpoint's)."""
        index = self._ranges.index((stage.start, stage.end))
        with self._lock:
            self.groups[index].append(stage)
            self.stages = [s for g in self.groups for s in g]
            if len(self.stages) > self._workers:
                self._workers = len(self.stages)
                self._parallel = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="chain-step")

    def gather_replica_states(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Each range's whole state (node.shard.Shard.replica_state) from one of its replicas, for a step
        checkpoint; a replica that fails is dropped and the next one asked."""
        states = {}
        for index, (start, end) in enumerate(self._ranges):
            while True:
                if not self.groups[index]:
                    raise self.lost(index)
                stage = self.groups[index][0]
                try:
                    result, tensors = self.call(stage, REPLICA_STATE, self._meta(stage))
                except SwarmConnectionError as error:
                    self.drop(stage, str(error))
                    continue
                states[(start, end)] = dict(zip(result.names, tensors))
                break
        return states

    def load_state(self, phase: str, kind: str, last_step: int, states: dict[tuple[int, int], dict[str, torch.Tensor]],
                   checkpoint: str = "") -> None:
        """Set every replica to a step checkpoint's state (`states` by range; `checkpoint` names it): phase
        `phase` after step `last_step`. The replicas of a range must then hash alike; a `load_state` audit event
        per node records what it took. Work the chain kept for later steps is forgotten: they are redone."""
        with self._lock:
            self._sent.clear()
            self._records.clear()
            self.dropped.clear()
            for stage in self.stages:
                stage.in_flight = 0
        self._phase_kind = kind
        calls = []
        for stage in list(self.stages):
            state = states[(stage.start, stage.end)]
            names = sorted(state)
            meta = self._meta(stage, phase=phase, phase_kind=kind, step=last_step, names=names)
            calls.append((stage, self._parallel.submit(self.call, stage, LOAD_STATE, meta, [state[n] for n in names])))
        hashes = {}  # node id -> (weights, optimizer state) hashes
        for stage, call in calls:
            try:
                result = call.result()[0]
            except SwarmConnectionError as error:
                self.drop(stage, str(error))
                continue
            hashes[stage.node_id] = (result.weights_sha256, result.optimizer_sha256)
        for index, group in enumerate(self.groups):
            if not group:
                raise self.lost(index)
            if len({hashes[stage.node_id] for stage in group}) > 1:
                raise RemoteBlockError(f"the replicas of blocks {self._range(index)} hash to different states "
                                       f"after loading the same checkpoint")
        if self.audit is not None:
            for node, (weights, optimizer) in sorted(hashes.items()):
                self.audit.append_event("load_state", node_id=node, step=last_step, phase=phase, checkpoint=checkpoint,
                                        weights_sha256=weights, optimizer_sha256=optimizer)

    def configure_phase(self, phase: str, kind: str, adapter_action: str, lora_seed: str) -> None:
        self._phase_kind = kind
        for stage in self.stages:
            meta = self._meta(stage, phase=phase, phase_kind=kind, adapter_action=adapter_action, lora_seed=lora_seed)
            self.call(stage, PHASE, meta)

    def restore(self, stage: RemoteStage, phase: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set a node's blocks to `tensors` (base under checkpoint names, LoRA under PEFT names), the state
        at the end of the finished phase `phase`; sent sorted by name, the order the node takes them in."""
        names = sorted(tensors)
        self.call(stage, RESTORE, self._meta(stage, phase=phase), [tensors[name] for name in names])

    def _gather(self, method: str) -> dict[str, torch.Tensor]:
        """From the first replica of each range (replicas hold identical weights)."""
        gathered = {}
        for stage in (group[0] for group in self.groups):
            result, tensors = self.call(stage, method, self._meta(stage))
            gathered.update(zip(result.names, tensors))
        return gathered

    def gather_step_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """Each node's weights and AdamW state before and after `step`, its last applied step, by node id."""
        states = {}
        for stage in self.stages:
            result, tensors = self.call(stage, STEP_STATE, self._meta(stage, step=step))
            states[stage.node_id] = dict(zip(result.names, tensors))
        return states

    def gather_adapter(self) -> dict[str, torch.Tensor]:
        """Every node's LoRA tensors under PEFT key names."""
        return self._gather(ADAPTER)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """Every node's base block tensors under checkpoint names (to save a pretrained model)."""
        return self._gather(WEIGHTS)

    def stream_totals(self) -> dict[str, list[int]]:
        """Bytes [sent, received] per stream so far, summed over the stages."""
        totals: dict[str, list[int]] = {}
        for stage in self.stages:
            for stream, (sent, received) in stage.stream_bytes.items():
                total = totals.setdefault(stream, [0, 0])
                total[0] += sent
                total[1] += received
        return totals

    @property
    def bytes_sent(self) -> int:
        return sum(stage.bytes_sent for stage in self.stages)

    @property
    def bytes_received(self) -> int:
        return sum(stage.bytes_received for stage in self.stages)
