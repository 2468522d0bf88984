"""The trainer's end of the nodes' direct data channels (swarm.p2p.direct): per node, where its channel
listens, learned once over hivemind P2P, and the idle TLS connections to it, one per call in flight.

A node that serves no channel, or whose channel cannot be reached (a volunteer behind NAT, a firewall), is
called over hivemind P2P as before, which relays and punches holes where a direct connection cannot go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.p2p.direct import (CHANNEL_SERVER_NAME, END_OF_REQUEST, HANDSHAKE_TIMEOUT_S, ReplyEnd, client_context,
                              send_messages)
from swarm.p2p.framing import receive_frame
from swarm.p2p.rpc import CHANNEL, reply_tensor_count
from swarm.p2p.tensors import aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult

logger = logging.getLogger("swarm.coordinator")

ASK_AGAIN_S = 60.0  # after a node gave no answer to `channel` (not a refusal), its calls go over P2P this long


class ChannelUnreachable(ConnectionError):
    """No connection to the node's channel could be opened: the node is called over P2P instead."""


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass
class Channel:
    """One node's channel: where it listens, the certificate it presents, the token it expects."""

    host: str
    port: int
    certificate_pem: bytes
    token: bytes
    idle: list[Connection] = field(default_factory=list)

    async def call(self, method: str, requests: list) -> AsyncIterator:
        """Send `requests` (the first naming `method`) on an idle or new connection; the reply's messages, up to
        its last tensor. The connection goes back to the idle ones only once the reply was read whole."""
        if self.idle:
            connection = self.idle.pop()
        else:
            try:
                connection = await self._open()
            except OSError as error:  # refused, timed out, TLS failed (ssl.SSLError): not there to be reached
                raise ChannelUnreachable(f"{self.host}:{self.port}: {type(error).__name__}: {error}") from None
        first = runtime_pb2.ExpertRequest()
        first.CopyFrom(requests[0])
        first.uid = method
        try:
            await send_messages([first, *requests[1:], END_OF_REQUEST], connection.writer)
        except OSError as error:
            connection.close()
            raise ConnectionError(f"the direct data channel dropped: {error}") from None
        except BaseException:
            connection.close()
            raise
        return self._replies(connection)

    async def _open(self) -> Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=client_context(self.certificate_pem),
                                    server_hostname=CHANNEL_SERVER_NAME), HANDSHAKE_TIMEOUT_S)
        writer.write(self.token)
        return Connection(reader, writer)

    async def _replies(self, connection: Connection) -> AsyncIterator:
        end, whole = ReplyEnd(reply_tensor_count), False
        try:
            while not whole:
                message, error = await receive_frame(runtime_pb2.ExpertResponse, connection.reader)
                if error is not None:
                    raise ConnectionError(f"the node's channel answered with an error frame: {error.message!r}")
                whole = end.add(message)
                yield message
        finally:
            if whole:
                self.idle.append(connection)
            else:
                connection.close()

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class Channels:
    """The channel of every node called so far (None: that node is called over P2P)."""

    def __init__(self, p2p: P2P, job_id: str):
        self.p2p, self.job_id = p2p, job_id
        self._channels: dict[PeerID, Channel | None] = {}
        self._asking: dict[PeerID, asyncio.Future] = {}
        self._ask_again_at: dict[PeerID, float] = {}  # nodes that gave no answer (not a refusal): when to ask again

    async def of(self, peer_id: PeerID, block_start: int, block_end: int) -> Channel | None:
        """The node's channel, asked for once (by the first of concurrent calls); None: call it over P2P."""
        if peer_id in self._channels and time.monotonic() >= self._ask_again_at.get(peer_id, float("inf")):
            del self._channels[peer_id]  # it did not answer last time: ask again, once a while
        if peer_id in self._channels:
            return self._channels[peer_id]
        asking = self._asking.get(peer_id)
        if asking is None:
            asking = self._asking[peer_id] = asyncio.ensure_future(self._ask(peer_id, block_start, block_end))
            asking.add_done_callback(lambda _: self._asking.pop(peer_id, None))
        return await asyncio.shield(asking)

    def forget(self, peer_id: PeerID, error: Exception) -> None:
        """Call this node over P2P from now on: its channel could not be reached (`error`)."""
        channel = self._channels.get(peer_id)
        if channel is not None:
            channel.close()
            logger.warning("node %s: its direct data channel cannot be reached (%s); calling it over P2P",
                           peer_id, error)
        self._channels[peer_id] = None

    async def _ask(self, peer_id: PeerID, block_start: int, block_end: int) -> Channel | None:
        meta = CallMeta(job_id=self.job_id, block_start=block_start, block_end=block_end)
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), [])
        try:
            responses = await self.p2p.iterate_protobuf_handler(peer_id, CHANNEL, aiter_list(requests),
                                                                runtime_pb2.ExpertResponse)
            metadata, _, _ = await from_messages(responses, tensor_count=reply_tensor_count)
        except Exception as error:  # a node of an older version, or gone for now: over P2P, asked again later
            logger.info("node %s did not tell its direct data channel (%s); calling it over P2P", peer_id, error)
            self._channels[peer_id] = None
            self._ask_again_at[peer_id] = time.monotonic() + ASK_AGAIN_S
            return None
        result = CallResult.FromString(metadata)
        if result.status != CallResult.OK or not result.channel_port:
            logger.info("node %s serves no direct data channel (%s); calling it over P2P", peer_id, result.error)
            channel = None
        else:
            channel = Channel(result.channel_host, result.channel_port, result.channel_certificate,
                              result.channel_token)
        self._channels[peer_id] = channel
        self._ask_again_at.pop(peer_id, None)
        return channel

    def close(self) -> None:
        for channel in self._channels.values():
            if channel is not None:
                channel.close()
