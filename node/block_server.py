"""Serves a node's Shard over hivemind P2P: one handler per data-plane method (swarm.p2p.rpc), from forward,
backward and the optimizer step to replica state and generation sessions.

Handlers run on the P2P event loop and hand the tensor work to one compute thread, so calls never run
concurrently on the shard and the loop keeps answering while a block computes. How a trainer call is checked,
run, counted and answered is node.call_serving's; a step call's update and signed attestation are
node.step_attestation's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from node.call_serving import REPLY_LINGER_S, CallServing, linger
from node.call_stream import CallStream
from swarm.call_threads import one_thread, threads_for
from node.channel_server import ChannelServer
from node.replica_reduce import GradientReducer
from node.shard import Shard
from node.step_attestation import StepAttestation
from swarm.config import PHASE_KINDS
from swarm.identity import Identity
from swarm.p2p.direct import ChannelCredentials
from swarm.p2p.framing import state_reply_limit
from swarm.p2p.rpc import (ADAPTER, ADMIT, AVERAGE, BACKWARD, CHANNEL, END_SESSION, FETCH_STATE, FORWARD, INFER, LOAD_STATE,
                           PHASE, REPLICA_STATE, RESTORE, STEP, STEP_STATE, SYNC, WEIGHTS, reply_tensor_count)
from swarm.p2p.tensors import CHUNK_BYTES, aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 30
AVERAGE_WAIT_S = 300.0  # how long a peer's gradient part waits for the other parts of its step


class BlockServer:
    """A node's data-plane handlers for its shard; `trainer` is the only peer whose calls are served (None: any,
    for in-process tests), `max_request_bytes` the largest request read."""

    def __init__(self, shard: Shard, job_id: str, identity: Identity, trainer: PeerID | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.shard = shard
        self.job_id = job_id
        self.identity = identity
        self.max_request_bytes = max_request_bytes
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")
        self.reducer = GradientReducer(job_id, shard.start, shard.end)
        self.steps = StepAttestation(shard, job_id, identity, self.reducer)
        self.calls = CallServing(job_id, shard.block_range, trainer, max_request_bytes, self.compute,
                                 self.steps.traffic_of)
        self.admitted: set[PeerID] = set()  # new replicas the trainer allowed to fetch this node's state once
        self.loop: asyncio.AbstractEventLoop | None = None
        self.channel: ChannelServer | None = None

    async def add_handlers(self, p2p: P2P, channel_host: str | None = None, channel_port: int = 0) -> None:
        """Serve every method on `p2p`; with `channel_host`, the trainer's methods also on a direct data
        channel listening there (node.channel_server), which the trainer learns of by the CHANNEL call."""
        self.loop = asyncio.get_running_loop()
        self.reducer.p2p = p2p
        trainer_methods = {FORWARD: self._forward, BACKWARD: self._backward, STEP: self._step,
                           ADAPTER: self._adapter, PHASE: self._phase, WEIGHTS: self._weights,
                           STEP_STATE: self._step_state, RESTORE: self._restore, ADMIT: self._admit,
                           SYNC: self._sync, REPLICA_STATE: self._replica_state, LOAD_STATE: self._load_state,
                           INFER: self._infer, END_SESSION: self._end_session}
        if channel_host is not None:
            self.channel = ChannelServer(trainer_methods, p2p.peer_id, self.calls.trainer,
                                         ChannelCredentials.generate())
            await self.channel.start(channel_host, channel_port)
        for name, handler in (*trainer_methods.items(), (AVERAGE, self._average), (FETCH_STATE, self._fetch_state),
                              (CHANNEL, self._channel)):
            await p2p.add_binary_stream_handler(name, CallStream(p2p.peer_id, name, handler))

    def shutdown(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)
        if self.channel is not None and self.loop is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.channel.close(), self.loop)

    def _channel(self, requests, context: P2PContext):
        """Where this node's direct data channel listens, its certificate and its token; an ERROR without one."""
        def work(meta: CallMeta, tensors):
            if self.channel is None:
                raise ValueError("this node serves no direct data channel")
            return CallResult(status=CallResult.OK, channel_host=self.channel.host, channel_port=self.channel.port,
                              channel_certificate=self.channel.credentials.certificate_pem,
                              channel_token=self.channel.credentials.token), []

        return self.calls.serve(requests, context, work)

    def _forward(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            _expect_tensors(tensors, 3, "forward takes hidden states, attention mask and position ids")
            with threads_for(tensors[0], self.shard.blocks.weight_count):
                output = self.shard.forward(meta.step, meta.micro_batch, meta.train, *tensors,
                                            input_grad=not meta.input_grad_unused)
            return CallResult(status=CallResult.OK), [output]

        return self.calls.serve(requests, context, work, trains=lambda meta: meta.train)

    def _infer(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            _expect_tensors(tensors, 3, "infer takes the new positions' hidden states, the attention mask of all "
                                        "positions and the new positions' ids")
            with threads_for(tensors[0], self.shard.blocks.weight_count):
                output, kept = self.shard.infer(meta.session_id, meta.session_length, *tensors)
            return CallResult(status=CallResult.OK, session_length=kept), [output]

        return self.calls.serve(requests, context, work)

    def _end_session(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            self.shard.sessions.end(meta.session_id)
            return CallResult(status=CallResult.OK), []

        return self.calls.serve(requests, context, work)

    def _backward(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            expected = 4 if meta.includes_inputs else 1
            _expect_tensors(tensors, expected, "backward takes the output gradient (and, re-sent, the 3 inputs)")
            with threads_for(tensors[0], self.shard.blocks.weight_count):
                grad_input = self.shard.backward(meta.step, meta.micro_batch, tensors[0], tensors[1:] or None,
                                                 input_grad=not meta.input_grad_unused)
            return CallResult(status=CallResult.OK), [grad_input]

        return self.calls.serve(requests, context, work, trains=lambda meta: True)

    def _step(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            with one_thread():  # small ops, every range at once: a second thread only contends (swarm.call_threads)
                attestation, signed = self.steps.answer(meta, self.loop)
            averaged = self.steps.averaging_bytes
            return CallResult(status=CallResult.OK, compute_seconds=attestation.compute_seconds,
                              tokens=attestation.tokens, attestation=signed.payload, signature=signed.signature,
                              averaging_bytes_sent=averaged.sent, averaging_bytes_received=averaged.received), []

        return self.calls.serve(requests, context, work, trains=lambda meta: True)

    async def _average(self, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Another replica's part of a step's gradients for this node to sum (node_replica_reduce). Not the
        trainer's call: the reducer checks the sender against the group the trainer named for the step."""
        try:
            metadata, tensors, received = await from_messages(requests, self.max_request_bytes)
            meta = CallMeta.FromString(metadata)
            self.calls.check_call(meta)
            self.calls.traffic.add(received=received)
            summed, size = await self.reducer.handle(meta, tensors, context.remote_id, received,
                                                     timeout=AVERAGE_WAIT_S)
            self.calls.traffic.add(sent=size)
            chunks = list(split_for_streaming(summed, CHUNK_BYTES))
            yield runtime_pb2.ExpertResponse(
                metadata=CallResult(status=CallResult.OK, tensor_count=1).SerializeToString(), tensors=chunks[:1])
            for chunk in chunks[1:]:
                yield runtime_pb2.ExpertResponse(tensors=[chunk])
        except Exception as error:  # ReduceError included: the peer hears why, the node serves on
            logger.warning("rejected a gradient part: %s", error)
            result = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}")
            yield runtime_pb2.ExpertResponse(metadata=result.SerializeToString())
        await linger(requests, REPLY_LINGER_S)  # until the peer, which has it all, closes the stream

    def _admit(self, requests, context: P2PContext):
        """The trainer lets a new replica of this range fetch this node's state (once); the reply holds the
        hashes the new replica must end with."""
        def work(meta: CallMeta, tensors):
            if len(meta.replica_peers) != 1:
                raise ValueError("admit names exactly one new replica")
            self.admitted.add(PeerID.from_base58(meta.replica_peers[0]))
            weights, optimizer = self.shard.state_hashes()
            return CallResult(status=CallResult.OK, weights_sha256=weights, optimizer_sha256=optimizer), []

        return self.calls.serve(requests, context, work)

    async def _fetch_state(self, requests, context: P2PContext):
        """An admitted new replica takes this node's whole state (Shard.replica_state), between steps."""
        refusal = PermissionError(f"peer {context.remote_id} was not admitted as a replica of this range")
        if context.remote_id not in self.admitted:
            async for message in self.calls.refuse(requests, context, refusal):
                yield message
            return
        try:
            metadata, _, received = await from_messages(requests, self.max_request_bytes)
            if context.remote_id not in self.admitted:  # another stream of its took the state meanwhile
                raise refusal
            self.admitted.discard(context.remote_id)
            self.calls.traffic.add(received=received)
            state = await asyncio.get_running_loop().run_in_executor(self.compute, self.shard.replica_state)
            result, outputs = _named_tensors(state)
        except Exception as error:
            logger.warning("refused a state fetch: %s", error)
            result, outputs = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}"), []
        result.tensor_count = len(outputs)
        for message in to_messages(runtime_pb2.ExpertResponse, result.SerializeToString(), outputs):
            self.calls.traffic.add(sent=message.ByteSize())
            yield message
        await linger(requests, REPLY_LINGER_S)  # until the new replica, which has it all, closes the stream

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

        return self.calls.serve(requests, context, work)

    def _replica_state(self, requests, context: P2PContext):
        """This node's whole state (Shard.replica_state), for the trainer's step checkpoint."""
        return self.calls.serve(requests, context, lambda meta, tensors: _named_tensors(self.shard.replica_state()))

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

        return self.calls.serve(requests, context, work)

    def _become(self, meta: CallMeta, state: dict) -> CallResult:
        """Take `state` as this range's state in phase `meta.phase` after step `meta.step`: later steps only."""
        weights, optimizer = self.shard.load_replica_state(meta.phase, meta.phase_kind, meta.step, state)
        self.steps.forget()
        self.loop.call_soon_threadsafe(self.reducer.start_after, meta.step)
        return CallResult(status=CallResult.OK, weights_sha256=weights, optimizer_sha256=optimizer)

    async def _fetch_from(self, source: PeerID) -> dict:
        meta = CallMeta(job_id=self.job_id, block_start=self.shard.start, block_end=self.shard.end)
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), [])
        responses = await self.reducer.p2p.iterate_protobuf_handler(source, FETCH_STATE, aiter_list(requests),
                                                                    runtime_pb2.ExpertResponse)
        limit = state_reply_limit(sum(param.numel() for param in self.shard.blocks.parameters()))  # LoRA's included
        metadata, tensors, received = await from_messages(responses, limit, reply_tensor_count,
                                                          too_large=f"replica {source}'s state is larger than its limit")
        self.calls.traffic.add(received=received)
        result = CallResult.FromString(metadata)
        if result.status != CallResult.OK:
            raise ValueError(f"replica {source} refused its state: {result.error}")
        if len(tensors) != len(result.names):
            raise ConnectionError(f"replica {source}'s state arrived cut short ({len(tensors)} of "
                                  f"{len(result.names)} tensors); try again")
        return dict(zip(result.names, tensors))

    def _adapter(self, requests, context: P2PContext):
        return self.calls.serve(requests, context, lambda meta, tensors: _named_tensors(self.shard.adapter()))

    def _weights(self, requests, context: P2PContext):
        return self.calls.serve(requests, context, lambda meta, tensors: _named_tensors(self.shard.base_weights()))

    def _step_state(self, requests, context: P2PContext):
        """Weights and AdamW state before and after the last applied step (`before/...`, `after/...`), for the
        coordinator's replay snapshots."""
        def work(meta: CallMeta, tensors):
            state = self.shard.step_state(meta.step)
            return _named_tensors({**{f"before/{k}": v for k, v in state.before.items()},
                                   **{f"after/{k}": v for k, v in state.after.items()}})

        return self.calls.serve(requests, context, work)

    def _phase(self, requests, context: P2PContext):
        def work(meta: CallMeta, tensors):
            if meta.phase_kind not in PHASE_KINDS:
                raise ValueError(f"unknown phase kind {meta.phase_kind!r}")
            if meta.adapter_action not in ("continue", "merge", "new"):
                raise ValueError(f"unknown adapter action {meta.adapter_action!r}")
            self.shard.configure_phase(meta.phase, meta.phase_kind, meta.adapter_action, meta.lora_seed)
            logger.info("phase %s (%s, adapter %s)", meta.phase, meta.phase_kind, meta.adapter_action)
            return CallResult(status=CallResult.OK), []

        return self.calls.serve(requests, context, work)

    def _restore(self, requests, context: P2PContext):
        """A resumed coordinator sets the blocks to the end of its last finished phase (`meta.phase`): base
        and LoRA tensors, sorted by name. The step records go too: steps are redone."""
        def work(meta: CallMeta, tensors):
            self.shard.restore(meta.phase, tensors)
            self.loop.call_soon_threadsafe(self.reducer.reset)
            self.steps.forget()
            logger.info("restored to the end of phase %r", meta.phase or "(none)")
            return CallResult(status=CallResult.OK), []

        return self.calls.serve(requests, context, work)


def _named_tensors(tensors: dict) -> tuple[CallResult, list]:
    names = sorted(tensors)
    return CallResult(status=CallResult.OK, names=names), [tensors[name] for name in names]


def _expect_tensors(tensors: list, count: int, message: str) -> None:
    if len(tensors) != count:
        raise ValueError(f"{message}; got {len(tensors)} tensors")
