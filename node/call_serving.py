"""How a node serves one data-plane call, whichever method it is: only the job's trainer is served, the call must
be of this job and range, the work runs on the node's one compute thread, every byte is counted, and a bad call
gets an ERROR result naming the problem while the node serves on.

A caller that may not call is answered before its request is read (`refuse`), so a stranger's streams cost the
node neither memory nor descriptors. A replied P2P stream stays open until the caller closes it: closing right
after the last write lost about 1 reply in 1,000 on the way (docs/ARCHITECTURE.md, Data plane); on the direct
data channel (node.channel_server) the reply ends at its last tensor and the connection carries the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from node.channel_server import ChannelContext
from node.inference_sessions import MissingSession
from node.shard import MissingActivations
from swarm.block_range import BlockRange
from swarm.p2p.codecs import CODECS, codec_type
from swarm.p2p.tensors import from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from swarm.traffic import Traffic

logger = logging.getLogger(__name__)

REPLY_LINGER_S = 30.0  # at most this long a replied call's stream stays open for the trainer to close it
REFUSAL_LINGER_S = 2.0  # at most this long a refused peer's stream stays open (see CallServing.refuse)

Work = Callable[[CallMeta, list], tuple[CallResult, list]]


class CallServing:
    """Serves calls to one node's range: `serve` runs a method's `work(meta, tensors)` for the trainer.

    `step_traffic(step)` is the running count of what training step `step`'s calls moved (its attestation
    states it); `traffic` counts all the node's data-plane bytes.
    """

    def __init__(self, job_id: str, blocks: BlockRange, trainer: PeerID | None, max_request_bytes: int,
                 compute: ThreadPoolExecutor, step_traffic: Callable[[int], Traffic]):
        self.job_id, self.blocks = job_id, blocks
        self.trainer = trainer  # the only peer whose calls are served (None: any, for in-process tests)
        self.max_request_bytes = max_request_bytes
        self.compute = compute
        self.step_traffic = step_traffic
        self.traffic = Traffic()

    def check_call(self, meta: CallMeta) -> None:
        """The call must be of this job and of exactly this node's range."""
        if meta.job_id != self.job_id:
            raise ValueError(f"unknown job id {meta.job_id!r}")
        if (meta.block_start, meta.block_end) != (self.blocks.start, self.blocks.end):
            raise ValueError(
                f"this node serves blocks {self.blocks}, not {BlockRange(meta.block_start, meta.block_end)}"
            )

    async def serve(self, requests: AsyncIterator, context: P2PContext, work: Work,
                    trains: Callable[[CallMeta], bool] = lambda meta: False
                    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Check the caller is the job's trainer and the call belongs to this job and range, then run
        `work(meta, tensors)` on the compute thread.

        `trains(meta)` says whether the call is part of training step `meta.step`, whose bytes it then counts.
        A call whose stream closes before its reply is out is logged, with how far it got.
        """
        if self.trainer is not None and context.remote_id != self.trainer:
            refusal = PermissionError(f"peer {context.remote_id} is not this job's trainer; its calls are refused")
            async for message in self.refuse(requests, context, refusal):
                yield message
            return
        doing = "reading the request or computing"
        try:
            async for message in self._answer(requests, context, work, trains):
                doing = "sending the reply"
                yield message
            # Hold this end open until the trainer, which knows from the reply's tensor_count when it has it all,
            # closes the stream. The stream's reader (node.call_stream) ends this handler when the trainer's end closes.
            doing = "done"
            if not isinstance(context, ChannelContext):  # the channel's connection carries the next call
                await linger(requests, REPLY_LINGER_S)
        except (asyncio.CancelledError, GeneratorExit):
            if doing != "done":  # the stream ended before the reply was out: the trainer will ask again
                logger.warning("%s from %s: the stream closed while %s", context.handle_name, context.remote_id,
                               doing)
            raise

    async def refuse(self, requests: AsyncIterator, context: P2PContext, error: PermissionError
                     ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Answer a peer that may not make this call before reading its request, so that a stranger's stream
        costs the node no memory and ends within REFUSAL_LINGER_S, even one whose request never ends (a
        stranger holding 1,000 of them must not hold the node's memory or descriptors).

        The stream stays open that long for the reply to get out (see `serve`), reading and dropping what
        the peer still sends (`linger`): a stream reader stalled by unread messages would not notice it close."""
        logger.warning("refused %s from %s: %s", context.handle_name, context.remote_id, error)
        result = CallResult(status=CallResult.ERROR, error=f"{type(error).__name__}: {error}")
        yield runtime_pb2.ExpertResponse(metadata=result.SerializeToString())
        if not isinstance(context, ChannelContext):
            await linger(requests, REFUSAL_LINGER_S)

    async def _answer(self, requests: AsyncIterator, context: P2PContext, work: Work, trains
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        step_bytes, codec = None, CODECS["none"]  # the reply's codec stays `none` for a refused call
        try:
            # Read (up to the size limit) before refusing anything, so the caller gets the reply, not a reset.
            metadata, tensors, received = await from_messages(requests, self.max_request_bytes)
            self.traffic.add(received=received)
            meta = CallMeta.FromString(metadata)
            self.check_call(meta)
            reply_codec = codec_type(meta.reply_codec or "none")
            if trains(meta):
                step_bytes = self.step_traffic(meta.step)
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
            size = message.ByteSize()  # upb encodes the message to size it: once, not once per count
            self.traffic.add(sent=size)
            if step_bytes is not None:
                step_bytes.add(sent=size)
            yield message


async def linger(requests: AsyncIterator, seconds: float) -> None:
    """Hold a replied stream open for at most `seconds`, until the caller, which has the reply, closes it (the
    stream reader then ends the handler). What the caller still sends is read and dropped: a request the
    handler stopped reading early (too large, malformed) would otherwise fill the reader's queue and stall it,
    and a stalled reader does not see the stream close."""
    async def drop_the_rest() -> None:
        with contextlib.suppress(Exception):  # a request that ended in an error has nothing more to read
            async for _ in requests:
                pass
        await asyncio.sleep(seconds)

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drop_the_rest(), seconds)
