"""One call to a replica over hivemind P2P: serialize, send, check the reply's shape, retry a lost reply, and
meter the bytes per stream."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import runtime_pb2

from coordinator.chain.channels import ChannelUnreachable, Channels
from coordinator.chain.stage import RemoteStage
from swarm.errors import RemoteBlockError, SwarmConnectionError
from swarm.p2p.codecs import CODECS
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.framing import MAX_FRAME_BYTES, state_reply_limit
from swarm.p2p.rpc import BACKWARD, FORWARD, INFER, reply_tensor_count
from swarm.p2p.tensors import aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult

logger = logging.getLogger("swarm.coordinator")

CALL_ATTEMPTS = 3
# A forward, backward or infer reply is one batch of hidden states (or their gradient) for the batch the request
# sent: at most 4x the request's bytes (a float32 reply to an 8-bit request) and a frame.
DATA_REPLY_ALLOWANCE = 4
LOST_REPLY = (ConnectionError, asyncio.IncompleteReadError, P2PDaemonError)  # asked again: every method is idempotent


def hidden_reply(stage: RemoteStage, method: str, outputs: list[torch.Tensor], shape) -> torch.Tensor:
    """The one tensor of a forward, backward or infer reply, checked before it goes anywhere (the next range, the
    trainer's head, the range before): floating point, of `shape`. A node that answers anything else broke the
    protocol (a liar or a broken build), so it is treated as one that cannot be reached: it leaves the chain and
    another replica serves its range or a spare takes the range over. Passed on, the next range would refuse it
    and be the one blamed, or the head would fail with a traceback."""
    output = outputs[0]
    if not output.is_floating_point() or tuple(output.shape) != tuple(shape):
        raise SwarmConnectionError(f"{stage} answered {method.rsplit('.', 1)[-1]} with a {output.dtype} tensor of "
                                   f"shape {list(output.shape)}, not a floating-point one of shape {list(shape)}")
    return output


class Transport:
    def __init__(self, p2p: P2P, loop: LoopThread, job_id: str, timeout_s: float, workers: int = 1,
                 direct_channels: bool = True, range_parameters: Callable[[int, int], int] | None = None):
        """`range_parameters(start, end)`: how many parameters blocks [start, end) have, which bounds what a
        node may answer besides forward, backward and infer (None: not bounded, for tests of other things)."""
        self.p2p, self.loop, self.job_id, self.timeout_s = p2p, loop, job_id, timeout_s
        self._range_parameters = functools.cache(range_parameters) if range_parameters is not None else None
        self._workers = max(1, workers)
        self._parallel = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="chain-call")
        self.channels = Channels(p2p, job_id) if direct_channels else None

    @property
    def peer_wait_s(self) -> float:
        """How long a node waits for another node during a call (a replica's gradient part, a state fetch): half
        the call's timeout, so that a node whose partner died answers with the error before the trainer gives
        up on it, and only the dead node leaves the chain."""
        return self.timeout_s / 2

    def submit(self, stage: RemoteStage, method: str, meta: CallMeta, tensors=(), codecs=CODECS["none"]) -> Future:
        """`call` on a worker thread, so that calls to several replicas run at once."""
        return self._parallel.submit(self.call, stage, method, meta, tensors, codecs)

    def grow(self, workers: int) -> None:
        """Room for `workers` calls at once (one per replica)."""
        if workers > self._workers:
            self._workers = workers
            self._parallel = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chain-call")

    def meta(self, stage: RemoteStage, **fields) -> CallMeta:
        return CallMeta(job_id=self.job_id, block_start=stage.start, block_end=stage.end, **fields)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker threads and this P2P client (its daemon connection's reader and writer tasks), so
        nothing of it is left for the garbage collector once the loop is gone."""
        self._parallel.shutdown(wait=False, cancel_futures=True)
        if not self.loop.loop.is_closed():
            if self.channels is not None:
                self.loop.loop.call_soon_threadsafe(self.channels.close)
            try:
                self.loop.run(self.p2p.shutdown(), timeout=timeout)
            except (TimeoutError, RuntimeError):
                pass  # the loop shutdown cancels whatever is left

    def call(self, stage: RemoteStage, method: str, meta: CallMeta, tensors=(), codecs=CODECS["none"]
             ) -> tuple[CallResult, list[torch.Tensor]]:
        """One call, retried when the connection drops without a reply. Every method is safe to repeat:
        nodes answer a repeated backward from its kept result and apply a step or phase change once."""
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                result, outputs = self.loop.run(self._attempt(stage, method, meta, list(tensors), codecs),
                                                timeout=self.timeout_s)
                break
            except (TimeoutError, asyncio.TimeoutError):
                raise SwarmConnectionError(f"{stage} did not answer {method} within {self.timeout_s:.0f} s") from None
            except LOST_REPLY as error:
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

    async def _attempt(self, stage: RemoteStage, method: str, meta: CallMeta, tensors, codecs
                       ) -> tuple[CallResult, list[torch.Tensor]]:
        """One attempt. Its bytes count towards the method's stream once it is answered; a lost attempt's (to
        be asked again) go to the `retried` stream, so per-stream figures are the traffic a call takes and
        retries show apart."""
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), tensors, codecs)
        sent = sum(message.ByteSize() for message in requests)
        stage.bytes_sent += sent
        received = 0
        stream = method.rsplit(".", 1)[-1]
        try:
            responses = await self._send(stage, method, requests)
            metadata, outputs, received = await from_messages(responses, self._reply_limit(stage, method, sent),
                                                              reply_tensor_count,
                                                              too_large=f"the {stream} reply is larger than its limit")
            stage.bytes_received += received
            result = CallResult.FromString(metadata)
            expected = len(result.names) if result.names else (
                1 if result.status == CallResult.OK and method in (FORWARD, BACKWARD, INFER) else len(outputs))
            if len(outputs) != expected:
                # a stream cut between two tensors decodes cleanly but short: a lost reply, to be asked again
                raise ConnectionError(f"the reply should hold {expected} tensors but {len(outputs)} arrived")
        except LOST_REPLY:
            stage.count("retried", sent, received)
            raise
        except BaseException:  # refused or timed out: the traffic still belongs to the method
            stage.count(stream, sent, received)
            raise
        stage.count(stream, sent, received)
        return result, outputs

    def _reply_limit(self, stage: RemoteStage, method: str, sent: int) -> int | None:
        """The most bytes `stage` may answer this call with: a node's reply past it is refused as it arrives,
        not held (swarm.p2p.framing bounds each frame; this bounds their sum)."""
        if method in (FORWARD, BACKWARD, INFER):
            return DATA_REPLY_ALLOWANCE * sent + MAX_FRAME_BYTES
        if self._range_parameters is None:
            return None
        return state_reply_limit(self._range_parameters(stage.start, stage.end))  # any other reply: a state at most

    async def _send(self, stage: RemoteStage, method: str, requests: list) -> AsyncIterator:
        """The reply's messages: over the node's direct data channel where it has one that can be reached
        (coordinator.chain.channels), else over hivemind P2P."""
        channel = None if self.channels is None else await self.channels.of(stage.peer_id, stage.start, stage.end)
        if channel is not None:
            try:
                return await channel.call(method, requests)
            except ChannelUnreachable as error:
                self.channels.forget(stage.peer_id, error)
        return await self.p2p.iterate_protobuf_handler(stage.peer_id, method, aiter_list(requests),
                                                       runtime_pb2.ExpertResponse)
