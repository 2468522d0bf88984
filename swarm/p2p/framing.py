"""hivemind's framing of a data-plane stream (a marker byte, an 8-byte length, the protobuf), read with a bound.

Why: hivemind's reader (`P2P.receive_protobuf`, and so `P2P.iterate_protobuf_handler`) reads as many bytes as a
frame's header declares and holds them all before it parses any: one 9-byte header and a stream of zeros made a
node buffer 300 MB for a stranger who had only opened a stream to it (hivemind P2P lets any peer do that), and a
node could do the same to the trainer through a reply. Every frame a swarm process sends carries at most one
chunk of one tensor (swarm.p2p.tensors.CHUNK_BYTES) beside a call's metadata, so a header declaring more than
MAX_FRAME_BYTES is refused before anything of its body is read, on every stream both planes' peers read: a
node's requests (node.call_stream, node.channel_server), the trainer's replies and a node's replies from
another node (`BoundedP2P` here, in place of hivemind's `P2P.iterate_protobuf_handler`; coordinator.chain.channels).
The bytes on the wire are hivemind's, so either end may still be hivemind's own code.

Frames are also written here (`send_frame`): hivemind's writer hands a frame's body to the transport in 64 KiB
pieces, each its own `send` syscall (and on the direct data channel its own TLS write); `send_frame` writes
the same bytes as a header and a body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.p2p.tensors import CHUNK_BYTES

MAX_FRAME_BYTES = CHUNK_BYTES + (1 << 20)  # a tensor chunk and a call's metadata (names, attestation: kilobytes)


def state_reply_limit(parameters: int) -> int:
    """The most bytes a state reply (weights, AdamW moments, a replica's state) of a range with `parameters` base
    parameters may take: step_state's weights and moments before and after a step are 6x what the phase trains,
    a replica's state its base and LoRA weights and their moments; 16x the base in float32 leaves room for an
    adapter as large as the base weights."""
    return 16 * 4 * parameters + MAX_FRAME_BYTES


class FrameTooLong(ValueError):
    """A frame's header declares more bytes than any frame a swarm process sends: the stream is given up."""


async def receive_frame(message_type, reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES
                        ) -> tuple[object | None, RPCError | None]:
    """The next frame as `P2P.receive_protobuf` returns it, (message, None) or (None, error frame), reading
    nothing of a body longer than `max_bytes`. Raises asyncio.IncompleteReadError when the stream ends,
    TypeError on an unknown marker (as hivemind does), FrameTooLong."""
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise TypeError("Invalid Protobuf message type")
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > max_bytes:
        raise FrameTooLong(f"a frame of {length} bytes declared; no swarm frame is longer than {max_bytes}")
    body = await reader.readexactly(length)
    if marker == P2P.ERROR_MARKER:
        return None, RPCError.FromString(body)
    return message_type.FromString(body), None


async def send_frame(message, writer: asyncio.StreamWriter) -> None:
    """`message` (a protobuf, or an RPCError: an error frame) framed as `P2P.send_protobuf` frames it, handed to
    the transport in two writes rather than one per 64 KiB."""
    marker = P2P.ERROR_MARKER if isinstance(message, RPCError) else P2P.MESSAGE_MARKER
    body = message.SerializeToString()
    writer.write(marker + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    writer.write(body)
    await writer.drain()


class BoundedP2P:
    """A hivemind P2P whose `iterate_protobuf_handler` reads every reply frame with the bound above; every other
    attribute is the P2P's own. The trainer and nodes make their data-plane calls through one (coordinator.assembly,
    node.join), so what a peer answers cannot make them hold more than a frame's worth at a time."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p

    def __getattr__(self, name: str):
        return getattr(self.p2p, name)

    async def iterate_protobuf_handler(self, peer_id: PeerID, name: str, requests: AsyncIterator, response_type
                                       ) -> AsyncIterator:
        """As hivemind's: opens a stream to `peer_id`'s handler `name`, writes `requests` and the end-of-stream
        marker while the replies are read, and yields the replies until the peer closes its end; an error
        frame raises P2PHandlerError."""
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer_id, name)

        async def write() -> None:
            async for request in requests:
                await send_frame(request, writer)
            await send_frame(P2P.END_OF_STREAM, writer)

        writing = asyncio.create_task(write())

        async def replies() -> AsyncIterator:
            with contextlib.closing(writer):
                try:
                    while True:
                        try:
                            response, error = await receive_frame(response_type, reader)
                        except asyncio.IncompleteReadError:  # the peer closed its end: the reply is complete
                            break
                        if error is not None:
                            raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {error.message}")
                        yield response
                    await writing
                finally:
                    writing.cancel()

        return replies()
