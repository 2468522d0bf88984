"""Serves a node's Shard over hivemind P2P: forward, backward, optimizer step and adapter download.

Handlers run on the P2P event loop and hand the tensor work to one compute thread, so calls never run
concurrently on the shard and the loop keeps answering while a block computes. A bad request gets an ERROR
result naming the problem; the node keeps serving.

Every applied step is answered with the node's signed `Attestation` of it. The bytes it reports are those of
the step's training calls (forward with `train`, backward, and the step request itself; the step's reply,
which carries the attestation, cannot count itself). A retried step call gets the same signed bytes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from node.replica_reduce import GradientReducer
from node.inference_sessions import MissingSession
from node.shard import MissingActivations, Shard
from swarm.audit.attestation import Attestation, MicroBatch, SignedAttestation, replica_group, sign_attestation
from swarm.block_range import BlockRange
from swarm.config import PHASE_KINDS
from swarm.identity import Identity
from swarm.p2p.codecs import CODECS, codec_type
from swarm.p2p.rpc import (ADAPTER, ADMIT, AVERAGE, BACKWARD, END_SESSION, FETCH_STATE, FORWARD, INFER, LOAD_STATE,
                           PHASE, REPLICA_STATE, RESTORE, STEP, STEP_STATE, SYNC, WEIGHTS, reply_tensor_count)
from swarm.p2p.tensors import CHUNK_BYTES, aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from swarm.traffic import Traffic

logger = logging.getLogger(__name__)


DEFAULT_MAX_REQUEST_BYTES = 1 << 30
AVERAGE_WAIT_S = 300.0  # how long a peer's gradient part waits for the other parts of its step
REPLY_LINGER_S = 30.0  # at most this long a replied call's stream stays open for the trainer to close it
REFUSAL_LINGER_S = 2.0  # at most this long a refused peer's stream stays open (see BlockServer._refuse)


class BlockServer:
    def __init__(self, shard: Shard, job_id: str, identity: Identity, trainer: PeerID | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.shard = shard
        self.job_id = job_id
        self.identity = identity
        self.trainer = trainer  # the only peer whose calls are served (None: any, for in-process tests)
        self.max_request_bytes = max_request_bytes
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")
        self.bytes_received = 0
        self.bytes_sent = 0
        self.step_bytes: dict[int, Traffic] = {}  # step id -> what its training calls moved
        self.last_attestation: tuple[Attestation, SignedAttestation] | None = None
        self.reducer = GradientReducer(job_id, shard.start, shard.end)
        self.averaging_bytes = Traffic()  # what summing the last step's gradients with the replicas moved
        self.admitted: set[PeerID] = set()  # new replicas the trainer allowed to fetch this node's state once
        self.loop: asyncio.AbstractEventLoop | None = None

    async def add_handlers(self, p2p: P2P) -> None:
        self.loop = asyncio.get_running_loop()
        self.reducer.p2p = p2p
        for name, handler in ((FORWARD, self._forward), (BACKWARD, self._backward), (STEP, self._step),
                              (ADAPTER, self._adapter), (PHASE, self._phase), (WEIGHTS, self._weights),
                              (STEP_STATE, self._step_state), (RESTORE, self._restore), (AVERAGE, self._average),
                              (ADMIT, self._admit), (SYNC, self._sync), (FETCH_STATE, self._fetch_state),
                              (REPLICA_STATE, self._replica_state), (LOAD_STATE, self._load_state),
                              (INFER, self._infer), (END_SESSION, self._end_session)):
            await p2p.add_protobuf_handler(name, handler, runtime_pb2.ExpertRequest, stream_input=True,
                                           stream_output=True)

    def shutdown(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, requests: AsyncIterator, context: P2PContext, work, trains=lambda meta: False
                     ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Check the caller is the job's trainer and the call belongs to this job and range, then run
        `work(meta, tensors)` on the compute thread.

        `trains(meta)` says whether the call is part of training step `meta.step`, whose bytes it then counts.
        A call whose stream closes before its reply is out is logged, with how far it got.
        """
        if self.trainer is not None and context.remote_id != self.trainer:
            refusal = PermissionError(f"peer {context.remote_id} is not this job's trainer; its calls are refused")
            async for message in self._refuse(requests, context, refusal):
                yield message
            return
        doing = "reading the request or computing"
        try:
            async for message in self._answer(requests, context, work, trains):
                doing = "sending the reply"
                yield message
            # Hold this end open until the trainer, which knows from the reply's tensor_count when it has it all,
            # closes the stream: closing right after the last write lost about 1 reply in 1,000 on the way
            # (docs/ARCHITECTURE.md, Data plane). hivemind ends this handler when the trainer's end closes.
            doing = "done"
            await asyncio.sleep(REPLY_LINGER_S)
        except (asyncio.CancelledError, GeneratorExit):
            if doing != "done":  # the stream ended before the reply was out: the trainer will ask again
                logger.warning("%s from %s: the stream closed while %s", context.handle_name, context.remote_id,
                               doing)
            raise

    async def _refuse(self, requests: AsyncIterator, context: P2PContext, error: PermissionError
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Answer a peer that may not make this call before reading its request, so that a stranger's stream
        costs the node no memory and ends within REFUSAL_LINGER_S, even one whose request never ends (a
        stranger holding 1,000 of them must not hold the node's memory or descriptors).

        The stream stays open that long for the reply to get out (see _serve), reading and dropping what
        the peer still sends: hivemind's reader, stalled by unread messages, would not notice it close."""
        logger.warning("refused %s from %s: %s", context.handle_name, context.remote_id, error)
        result = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}")
        yield runtime_pb2.ExpertResponse(metadata=result.SerializeToString())

        async def drop_the_rest() -> None:
            async for _ in requests:
                pass
            await asyncio.sleep(REFUSAL_LINGER_S)  # until the peer, which has the reply, closes the stream

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drop_the_rest(), REFUSAL_LINGER_S)

    async def _answer(self, requests: AsyncIterator, context: P2PContext, work, trains
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        step_bytes, codec = None, CODECS["none"]  # the reply's codec stays `none` for a refused call
        try:
            # Read (up to the size limit) before refusing anything, so the caller gets the reply, not a reset.
            metadata, tensors, received = await from_messages(requests, self.max_request_bytes)
            self.bytes_received += received
            meta = CallMeta.FromString(metadata)
            if meta.job_id != self.job_id:
                raise ValueError(f"unknown job id {meta.job_id!r}")
            if (meta.block_start, meta.block_end) != (self.shard.start, self.shard.end):
                raise ValueError(
                    f"this node serves blocks {self.shard.block_range}, not {BlockRange(meta.block_start, meta.block_end)}"
                )
            reply_codec = codec_type(meta.reply_codec or "none")
            if trains(meta):
                step_bytes = self.step_bytes.setdefault(meta.step, Traffic())
                step_bytes.add(received=received)
            loop = asyncio.get_running_loop()
            result, outputs = await loop.run_in_executor(self.compute, work, meta, tensors)
            codec = reply_codec
        except MissingActivations as error:
            result, outputs = CallResult(status=CallResult.MISSING_ACTIVATIONS, error=str(error)), []
        except MissingSession as error:
            result, outputs = CallResult(status=CallResult.MISSING_SESSION, error=str(error)), []
        except Exception as error:  # a bad call must never take the node down
            logger.warning("rejected call: %s", error)
            result, outputs = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}"), []
        result.tensor_count = len(outputs)
        for message in to_messages(runtime_pb2.ExpertResponse, result.SerializeToString(), outputs, codec):
            self.bytes_sent += message.ByteSize()
            if step_bytes is not None:
                step_bytes.add(sent=message.ByteSize())
            yield message

    def _forward(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            _expect_tensors(tensors, 3, "forward takes hidden states, attention mask and position ids")
            output = self.shard.forward(meta.step, meta.micro_batch, meta.train, *tensors)
            return CallResult(status=CallResult.OK), [output]

        return self._serve(requests, context, work, trains=lambda meta: meta.train)

    def _infer(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            _expect_tensors(tensors, 3, "infer takes the new positions' hidden states, the attention mask of all "
                                        "positions and the new positions' ids")
            output, kept = self.shard.infer(meta.session_id, meta.session_length, *tensors)
            return CallResult(status=CallResult.OK, session_length=kept), [output]

        return self._serve(requests, context, work)

    def _end_session(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            self.shard.sessions.end(meta.session_id)
            return CallResult(status=CallResult.OK), []

        return self._serve(requests, context, work)

    def _backward(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            expected = 4 if meta.includes_inputs else 1
            _expect_tensors(tensors, expected, "backward takes the output gradient (and, re-sent, the 3 inputs)")
            grad_input = self.shard.backward(meta.step, meta.micro_batch, tensors[0], tensors[1:] or None)
            return CallResult(status=CallResult.OK), [grad_input]

        return self._serve(requests, context, work, trains=lambda meta: True)

    def _step(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            if not meta.learning_rate > 0:
                raise ValueError(f"learning rate must be positive, got {meta.learning_rate}")
            if self.last_attestation is not None and self.last_attestation[0].step == meta.step:
                attestation, signed = self.last_attestation  # a retried call: the same signed bytes again
            else:
                attestation, signed = self.last_attestation = self._apply_and_attest(meta)
            return CallResult(status=CallResult.OK, compute_seconds=attestation.compute_seconds,
                              tokens=attestation.tokens, attestation=signed.payload, signature=signed.signature,
                              averaging_bytes_sent=self.averaging_bytes.sent,
                              averaging_bytes_received=self.averaging_bytes.received), []

        return self._serve(requests, context, work, trains=lambda meta: True)

    def _apply_and_attest(self, meta: CallMeta) -> tuple[Attestation, SignedAttestation]:
        shard = self.shard
        if shard.phase_name and meta.phase != shard.phase_name:
            raise ValueError(f"step {meta.step} is for phase {meta.phase!r}; this node is in {shard.phase_name!r}")
        group, averaged = list(meta.replica_nodes), Traffic()
        if len(meta.replica_peers) > 1:
            if len(group) != len(meta.replica_peers) or self.identity.fingerprint not in group:
                raise ValueError("the replica group must name one node per peer, this node among them")
            peers = [PeerID.from_base58(peer) for peer in meta.replica_peers]
            timeout = meta.averaging_timeout_s or 60.0

            def reduce(gradient):
                future = asyncio.run_coroutine_threadsafe(
                    self.reducer.reduce(meta.step, peers, meta.averaging_codec or "none", gradient, timeout), self.loop)
                result = future.result()
                averaged.sent, averaged.received = result.bytes_sent, result.bytes_received
                return result.gradient
        else:
            group, reduce = [], None
        work = shard.apply_step(meta.step, meta.learning_rate, reduce)
        if work is None:
            raise ValueError(f"step {meta.step} is older than the last applied step {shard.last_applied_step}")
        moved = self.step_bytes.pop(meta.step, Traffic()) + averaged
        for step in [step for step in self.step_bytes if step < meta.step]:
            del self.step_bytes[step]
        attestation = Attestation(
            job_id=self.job_id, phase=meta.phase, step=meta.step, block_start=shard.start, block_end=shard.end,
            replica_group=replica_group(shard.start, shard.end), node_id=self.identity.fingerprint,
            micro_batches=tuple(MicroBatch(index, digest) for index, digest in work.micro_batches.items()),
            adapter_sha256_before=work.weights_sha256_before, adapter_sha256_after=work.weights_sha256_after,
            optimizer_sha256_before=work.optimizer_sha256_before, optimizer_sha256_after=work.optimizer_sha256_after,
            gradient_sketch=tuple(work.gradient_sketch), tokens=work.tokens, compute_seconds=work.compute_seconds,
            bytes_sent=moved.sent, bytes_received=moved.received, averaged_with=tuple(group),
            local_gradient_sketch=tuple(work.local_gradient_sketch),
        )
        self.averaging_bytes = averaged
        logger.debug("step %d applied and attested", meta.step)
        return attestation, sign_attestation(attestation, self.identity)

    async def _average(self, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Another replica's part of a step's gradients for this node to sum (node_replica_reduce). Not the
        trainer's call: the reducer checks the sender against the group the trainer named for the step."""
        try:
            metadata, tensors, received = await from_messages(requests, self.max_request_bytes)
            meta = CallMeta.FromString(metadata)
            if meta.job_id != self.job_id:
                raise ValueError(f"unknown job id {meta.job_id!r}")
            if (meta.block_start, meta.block_end) != (self.shard.start, self.shard.end):
                raise ValueError(f"this node serves blocks {self.shard.block_range}, "
                                 f"not {BlockRange(meta.block_start, meta.block_end)}")
            self.bytes_received += received
            summed, size = await self.reducer.handle(meta, tensors, context.remote_id, received,
                                                     timeout=AVERAGE_WAIT_S)
            self.bytes_sent += size
            chunks = list(split_for_streaming(summed, CHUNK_BYTES))
            yield runtime_pb2.ExpertResponse(
                metadata=CallResult(status=CallResult.OK, tensor_count=1).SerializeToString(), tensors=chunks[:1])
            for chunk in chunks[1:]:
                yield runtime_pb2.ExpertResponse(tensors=[chunk])
        except Exception as error:  # ReduceError included: the peer hears why, the node serves on
            logger.warning("rejected a gradient part: %s", error)
            result = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}")
            yield runtime_pb2.ExpertResponse(metadata=result.SerializeToString())
        await asyncio.sleep(REPLY_LINGER_S)  # until the peer, which has it all, closes the stream (see _serve)

    def _admit(self, requests, context: P2PContext):
        """The trainer lets a new replica of this range fetch this node's state (once); the reply holds the
        hashes the new replica must end with."""
        def work(meta: CallMeta, tensors):
            if len(meta.replica_peers) != 1:
                raise ValueError("admit names exactly one new replica")
            self.admitted.add(PeerID.from_base58(meta.replica_peers[0]))
            weights, optimizer = self.shard.state_hashes()
            return CallResult(status=CallResult.OK, weights_sha256=weights, optimizer_sha256=optimizer), []

        return self._serve(requests, context, work)

    async def _fetch_state(self, requests, context: P2PContext):
        """An admitted new replica takes this node's whole state (Shard.replica_state), between steps."""
        refusal = PermissionError(f"peer {context.remote_id} was not admitted as a replica of this range")
        if context.remote_id not in self.admitted:
            async for message in self._refuse(requests, context, refusal):
                yield message
            return
        try:
            metadata, _, received = await from_messages(requests, self.max_request_bytes)
            if context.remote_id not in self.admitted:  # another stream of its took the state meanwhile
                raise refusal
            self.admitted.discard(context.remote_id)
            self.bytes_received += received
            state = await asyncio.get_running_loop().run_in_executor(self.compute, self.shard.replica_state)
            result, outputs = _named_tensors(state)
        except Exception as error:
            logger.warning("refused a state fetch: %s", error)
            result, outputs = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}"), []
        result.tensor_count = len(outputs)
        for message in to_messages(runtime_pb2.ExpertResponse, result.SerializeToString(), outputs):
            self.bytes_sent += message.ByteSize()
            yield message
        await asyncio.sleep(REPLY_LINGER_S)  # until the new replica, which has it all, closes the stream

    def _sync(self, requests, context: P2PContext):
        """The trainer makes this node a replica mid-job: fetch the state of the replica it names, continue
        in its phase after its last applied step."""
        def work(meta: CallMeta, tensors):
            if len(meta.replica_peers) != 1:
                raise ValueError("sync names exactly one replica to fetch the state from")
            source = PeerID.from_base58(meta.replica_peers[0])
            future = asyncio.run_coroutine_threadsafe(self._fetch_from(source), self.loop)
            state = future.result(timeout=meta.averaging_timeout_s or 300.0)
            result = self._become(meta, state)
            logger.info("took the state of replica %s (phase %s, after step %d)", source, meta.phase, meta.step)
            return result, []

        return self._serve(requests, context, work)

    def _replica_state(self, requests, context: P2PContext):
        """This node's whole state (Shard.replica_state), for the trainer's step checkpoint."""
        return self._serve(requests, context, lambda meta, tensors: _named_tensors(self.shard.replica_state()))

    def _load_state(self, requests, context: P2PContext):
        """The trainer rolls this range back to a step checkpoint (a state `_replica_state` gave): phase
        `meta.phase` after step `meta.step`; the steps after it will be redone."""
        def work(meta: CallMeta, tensors):
            if len(meta.names) != len(tensors) or len(set(meta.names)) != len(tensors):
                raise ValueError(f"load_state names {len(meta.names)} tensors (distinct: {len(set(meta.names))}) "
                                 f"but carries {len(tensors)}")
            result = self._become(meta, dict(zip(meta.names, tensors)))
            logger.info("rolled back to the checkpoint of phase %s after step %d", meta.phase, meta.step)
            return result, []

        return self._serve(requests, context, work)

    def _become(self, meta: CallMeta, state: dict) -> CallResult:
        """Take `state` as this range's state in phase `meta.phase` after step `meta.step`: later steps only."""
        weights, optimizer = self.shard.load_replica_state(meta.phase, meta.phase_kind, meta.step, state)
        self.last_attestation = None
        self.step_bytes.clear()
        self.loop.call_soon_threadsafe(self.reducer.start_after, meta.step)
        return CallResult(status=CallResult.OK, weights_sha256=weights, optimizer_sha256=optimizer)

    async def _fetch_from(self, source: PeerID) -> dict:
        meta = CallMeta(job_id=self.job_id, block_start=self.shard.start, block_end=self.shard.end)
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), [])
        responses = await self.reducer.p2p.iterate_protobuf_handler(source, FETCH_STATE, aiter_list(requests),
                                                                    runtime_pb2.ExpertResponse)
        metadata, tensors, received = await from_messages(responses, tensor_count=reply_tensor_count)
        self.bytes_received += received
        result = CallResult.FromString(metadata)
        if result.status != CallResult.OK:
            raise ValueError(f"replica {source} refused its state: {result.error}")
        if len(tensors) != len(result.names):
            raise ConnectionError(f"replica {source}'s state arrived cut short ({len(tensors)} of "
                                  f"{len(result.names)} tensors); try again")
        return dict(zip(result.names, tensors))

    def _adapter(self, requests, context: P2PContext):
        return self._serve(requests, context, lambda meta, tensors: _named_tensors(self.shard.adapter()))

    def _weights(self, requests, context: P2PContext):
        return self._serve(requests, context, lambda meta, tensors: _named_tensors(self.shard.base_weights()))

    def _step_state(self, requests, context: P2PContext):
        """Weights and AdamW state before and after the last applied step (`before/...`, `after/...`), for the
        coordinator's replay snapshots."""
        def work(meta: CallMeta, tensors):
            state = self.shard.step_state(meta.step)
            return _named_tensors({**{f"before/{k}": v for k, v in state.before.items()},
                                   **{f"after/{k}": v for k, v in state.after.items()}})

        return self._serve(requests, context, work)

    def _phase(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            if meta.phase_kind not in PHASE_KINDS:
                raise ValueError(f"unknown phase kind {meta.phase_kind!r}")
            if meta.adapter_action not in ("continue", "merge", "new"):
                raise ValueError(f"unknown adapter action {meta.adapter_action!r}")
            self.shard.configure_phase(meta.phase, meta.phase_kind, meta.adapter_action, meta.lora_seed)
            logger.info("phase %s (%s, adapter %s)", meta.phase, meta.phase_kind, meta.adapter_action)
            return CallResult(status=CallResult.OK), []

        return self._serve(requests, context, work)

    def _restore(self, requests, context: P2PContext):
        """A resumed coordinator sets the blocks to the end of its last finished phase (`meta.phase`): base
        and LoRA tensors, sorted by name. The step records go too: steps are redone."""
        def work(meta: CallMeta, tensors):
            self.shard.restore(meta.phase, tensors)
            self.loop.call_soon_threadsafe(self.reducer.reset)
            self.last_attestation = None
            self.step_bytes.clear()
            logger.info("restored to the end of phase %r", meta.phase or "(none)")
            return CallResult(status=CallResult.OK), []

        return self._serve(requests, context, work)


def _named_tensors(tensors: dict) -> tuple[CallResult, list]:
    names = sorted(tensors)
    return CallResult(status=CallResult.OK, names=names), [tensors[name] for name in names]


def _expect_tensors(tensors: list, count: int, message: str) -> None:
    if len(tensors) != count:
        raise ValueError(f"{message}; got {len(tensors)} tensors")
