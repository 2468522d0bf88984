"""The node's end of the direct data channel (swarm.p2p.direct): a TLS server on the node's host whose
connections, once they present the token the node gave its trainer over hivemind P2P, carry the trainer's
calls one after another, each answered by the same handler as on a P2P stream."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarm.p2p.direct import HANDSHAKE_TIMEOUT_S, TOKEN_BYTES, ChannelCredentials, ReplyEnd, drain_request, read_request
from swarm.p2p.framing import receive_frame, send_frame
from swarm.p2p.rpc import reply_tensor_count
from swarm.proto.blocks_pb2 import CallResult

logger = logging.getLogger(__name__)

# Connections at once that have not sent the token yet; a new one past this closes the one waiting longest. The
# trainer sends its token with its first bytes, so it waits a round trip at most: strangers holding connections
# open cannot keep it out (refusing new connections instead let them move the trainer to P2P for the run).
MAX_UNAUTHENTICATED = 64


@dataclass(frozen=True)
class ChannelContext(P2PContext):
    """A call that came over the channel: its reply ends at its last tensor, nothing lingers (node.call_serving)."""


class ChannelServer:
    """Serves `handlers` (method name -> handler(requests, context), as registered on P2P) to the one peer that
    holds `credentials.token`: the trainer, who got it over P2P (`trainer`, None: whoever holds it)."""

    def __init__(self, handlers: dict, local_id: PeerID, trainer: PeerID | None, credentials: ChannelCredentials):
        self.handlers, self.local_id, self.trainer, self.credentials = handlers, local_id, trainer, credentials
        self.server: asyncio.base_events.Server | None = None
        self.host, self.port = "", 0
        self._connections: set[asyncio.Task] = set()
        self._waiting: dict[asyncio.Task, None] = {}  # connections that have not sent the token, oldest first

    async def start(self, host: str, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._connection, host, port, ssl=self.credentials.server_context(),
                                                 ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        self.host, self.port = host, self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._connections):
            task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._waiting) >= MAX_UNAUTHENTICATED:  # the connection waiting longest for its token goes
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.cancel()
        self._connections.add(task)
        try:
            with contextlib.closing(writer):
                self._waiting[task] = None
                try:
                    authenticated = await self._authenticated(reader)
                finally:
                    self._waiting.pop(task, None)
                if not authenticated:
                    return
                while await self._call(reader, writer):
                    pass
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.CancelledError):
            pass  # the trainer closed the connection or went away: a lost reply is asked again
        except Exception:  # a malformed frame: no framing left on this connection
            logger.warning("channel connection closed after a malformed frame", exc_info=True)
        finally:
            self._connections.discard(task)

    async def _authenticated(self, reader: asyncio.StreamReader) -> bool:
        """The connection's first bytes must be the token (exactly its length, read within the handshake's
        time): a stranger gets nothing, and can make the node hold nothing more than that."""
        try:
            token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), HANDSHAKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            token = b""
        if not hmac.compare_digest(token, self.credentials.token):
            logger.warning("refused a channel connection without this node's token")
            return False
        return True

    async def _call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one call; False once the trainer closed the connection between calls."""
        try:
            first, error = await receive_frame(runtime_pb2.ExpertRequest, reader)
        except asyncio.IncompleteReadError:
            return False
        if error is not None:
            raise ConnectionError("a call began with an error frame")
        method, first.uid = first.uid, ""  # the handler sees (and counts) the very messages a P2P stream carries
        handler = self.handlers.get(method)
        state = {"ended": False}
        requests = read_request(first, reader, runtime_pb2.ExpertRequest, state)
        context = ChannelContext(handle_name=method, local_id=self.local_id, remote_id=self.trainer or self.local_id)
        replies = _unknown(method) if handler is None else handler(requests, context)
        end = ReplyEnd(reply_tensor_count)
        try:
            async for message in replies:
                await send_frame(message, writer)
                if end.add(message):
                    break
        finally:
            await replies.aclose()
            await requests.aclose()
        if not state["ended"]:
            await drain_request(reader, runtime_pb2.ExpertRequest)
        return True


async def _unknown(method: str):
    result = CallResult(status=CallResult.ERROR, error=f"this node serves no method {method!r} on its channel")
    yield runtime_pb2.ExpertResponse(metadata=result.SerializeToString())
