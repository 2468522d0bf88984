"""The node's end of a data-plane stream: hivemind's protobuf framing, read so that the stream's end is always seen.

hivemind's own reader (`P2P.add_protobuf_handler`) takes any error frame for the end of the request and queues
what follows for a handler that no longer reads; once its five-message queue is full it stops reading, never
sees the caller close, and the stream, its descriptor and its task stay for the life of the process (a fuzzed
`load_state` with an error frame first held its handler past every bound). Here the end-of-stream marker (an
empty error frame) ends the request, any other error frame fails it, frames after the end are dropped, and the
caller's close ends the handler, whatever the handler is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.p2p.framing import receive_frame, send_frame

logger = logging.getLogger(__name__)

PREFETCH = 5  # request messages read ahead of the handler, as hivemind's reader does

Handler = Callable[[AsyncIterator, P2PContext], AsyncIterator]


class CallerError(ConnectionError):
    """The caller ended its request with an error frame instead of the end-of-stream marker."""


class CallStream:
    """Serves one method's streams with `handler(requests, context)`, an async iterator of replies.

    Registered with `P2P.add_binary_stream_handler(name, CallStream(...))`; `handler` is kept as an attribute
    so that in-process tests can call it without sockets.
    """

    def __init__(self, local_id: PeerID, name: str, handler: Handler, request_type=runtime_pb2.ExpertRequest):
        self.local_id, self.name, self.handler, self.request_type = local_id, name, handler, request_type

    async def __call__(self, stream_info: StreamInfo, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=self.name, local_id=self.local_id, remote_id=stream_info.peer_id)
        queue: asyncio.Queue = asyncio.Queue(PREFETCH)
        with contextlib.closing(writer):
            replying = asyncio.create_task(self._reply(_queued(queue), context, writer))
            try:
                await self._read(reader, queue, replying)
            finally:
                replying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replying

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue, replying: asyncio.Task) -> None:
        """Feed the request to the handler until its end, then drop what follows; return when the caller closes
        the stream, sends a frame that is not one, or the handler is done."""
        ended = False
        while not replying.done():
            frame = await _first(receive_frame(self.request_type, reader), replying)
            if frame is None:
                return
            try:
                request, error = frame.result()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the caller closed the stream or went away
            except Exception as broken:  # an unknown marker, a message that does not parse: no framing left
                logger.warning("%s: a malformed frame (%s); the stream is closed", self.name, broken)
                return
            if ended:
                continue
            if error is not None:
                ended = True
                request = CallerError(f"the caller sent an error frame: {error.message!r}") if error.message else None
            if await _first(queue.put(request), replying) is None:
                return

    async def _reply(self, requests: AsyncIterator, context: P2PContext, writer: asyncio.StreamWriter) -> None:
        try:
            async for response in self.handler(requests, context):
                await send_frame(response, writer)
        except (ConnectionError, OSError):
            logger.debug("%s from %s: the caller left before the reply was out", self.name, context.remote_id)
        except Exception as error:  # a handler's own bug: the caller hears it, the node serves on
            logger.warning("%s from %s failed", self.name, context.remote_id, exc_info=True)
            with contextlib.suppress(Exception):
                await send_frame(RPCError(message=f"{type(error).__name__}: {error}"), writer)


async def _queued(queue: asyncio.Queue) -> AsyncIterator:
    while True:
        item = await queue.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item


async def _first(awaitable, replying: asyncio.Task) -> asyncio.Future | None:
    """`awaitable`'s finished future, or None (and `awaitable` cancelled) if the handler finishes first."""
    waiting = asyncio.ensure_future(awaitable)
    await asyncio.wait({waiting, replying}, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done():
        return waiting
    waiting.cancel()
    return None
