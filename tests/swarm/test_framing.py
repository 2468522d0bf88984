"""Bounded frames (swarm.p2p.framing): hivemind's framing read back as hivemind writes it, `send_frame` writing
hivemind's very bytes in two writes, a header declaring
more than any swarm frame refused before its body arrives, and `BoundedP2P` calls on real hivemind P2P daemons
answered as hivemind's own `iterate_protobuf_handler` answers them, except that a peer's oversized reply frame
ends the call at once instead of being buffered."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.p2p.framing import MAX_FRAME_BYTES, BoundedP2P, FrameTooLong, receive_frame, send_frame
from swarm.p2p.tensors import aiter_list, from_messages, to_messages

HUGE = 1 << 40


class _Sink:
    """An asyncio.StreamWriter's `write` and `drain`, keeping the bytes."""

    def __init__(self):
        self.data = bytearray()
        self.writes = 0

    def write(self, data) -> None:
        self.data += data
        self.writes += 1

    async def drain(self) -> None:
        pass


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def _written(*messages) -> bytes:
    sink = _Sink()
    for message in messages:
        await P2P.send_protobuf(message, sink)
    return bytes(sink.data)


def test_send_frame_writes_hivemind_framing_in_two_writes_a_frame():
    """The same bytes as `P2P.send_protobuf` (so hivemind's own reader, or an older node, reads them), for a
    message, an error frame and the end marker; a 4 MB tensor's frames go out in two writes each, not one per
    64 KiB as hivemind's do."""
    messages = [*to_messages(runtime_pb2.ExpertRequest, b"meta", [torch.randn(1 << 20)]), RPCError(message="no"),
                P2P.END_OF_STREAM]

    async def scenario():
        ours, theirs = _Sink(), _Sink()
        for message in messages:
            await send_frame(message, ours)
            await P2P.send_protobuf(message, theirs)
        assert bytes(ours.data) == bytes(theirs.data)
        assert ours.writes == 2 * len(messages) < theirs.writes
        reader = _reader(bytes(ours.data))
        for message in messages[:-2]:
            assert await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader) == (message, None)
        assert await P2P.receive_protobuf(runtime_pb2.ExpertRequest, reader) == (None, RPCError(message="no"))

    asyncio.run(scenario())


def test_frames_read_back_as_hivemind_writes_them():
    message = to_messages(runtime_pb2.ExpertRequest, b"meta", [torch.arange(10.0)])[0]

    async def scenario():
        reader = _reader(await _written(message, RPCError(message="refused"), P2P.END_OF_STREAM))
        assert await receive_frame(runtime_pb2.ExpertRequest, reader) == (message, None)
        assert await receive_frame(runtime_pb2.ExpertRequest, reader) == (None, RPCError(message="refused"))
        assert await receive_frame(runtime_pb2.ExpertRequest, reader) == (None, RPCError())
        with pytest.raises(asyncio.IncompleteReadError):
            await receive_frame(runtime_pb2.ExpertRequest, reader)

    asyncio.run(scenario())


def test_the_largest_frame_a_swarm_process_sends_is_read():
    # to_messages puts one chunk of one tensor and the metadata in a message: a full chunk with large metadata
    messages = to_messages(runtime_pb2.ExpertResponse, b"m" * 60_000, [torch.zeros(3 << 18)])  # 3 MiB: three full chunks
    assert len(messages) == 3 and max(message.ByteSize() for message in messages) < MAX_FRAME_BYTES

    async def scenario():
        reader = _reader(await _written(*messages))
        return [(await receive_frame(runtime_pb2.ExpertResponse, reader))[0] for _ in messages]

    assert asyncio.run(scenario()) == messages


def test_a_header_declaring_more_than_any_swarm_frame_is_refused_before_its_body_arrives():
    header = P2P.MESSAGE_MARKER + (MAX_FRAME_BYTES + 1).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)

    async def scenario():
        # the body never comes and the stream stays open: hivemind's reader would wait for it (and hold it)
        with pytest.raises(FrameTooLong, match=f"a frame of {MAX_FRAME_BYTES + 1} bytes declared"):
            await asyncio.wait_for(receive_frame(runtime_pb2.ExpertRequest, _reader(header, eof=False)), 5)
        with pytest.raises(TypeError):
            await receive_frame(runtime_pb2.ExpertRequest, _reader(b"\x07" + header[1:]))

    asyncio.run(scenario())


async def _pair() -> tuple[P2P, P2P]:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              initial_peers=[str(addr) for addr in await server.get_visible_maddrs()])
    return server, client


def test_bounded_calls_get_the_replies_hivemind_gets():
    async def echo(requests, context):
        async for request in requests:
            yield runtime_pb2.ExpertResponse(metadata=request.metadata, tensors=request.tensors)

    async def scenario():
        server, client = await _pair()
        try:
            await server.add_protobuf_handler("echo", echo, runtime_pb2.ExpertRequest, stream_input=True,
                                              stream_output=True)
            requests = to_messages(runtime_pb2.ExpertRequest, b"meta", [torch.randn(700_000), torch.arange(5)])
            answers = []
            for caller in (client, BoundedP2P(client)):
                replies = await caller.iterate_protobuf_handler(server.peer_id, "echo", aiter_list(requests),
                                                                runtime_pb2.ExpertResponse)
                answers.append([reply async for reply in replies])
            assert answers[0] == answers[1] and len(answers[1]) == len(requests)
            _, tensors, _ = await from_messages(aiter_list(answers[1]))
            assert torch.equal(tensors[1], torch.arange(5))
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


def test_a_peer_that_declares_a_huge_reply_frame_ends_the_call_at_once():
    streamed = []

    async def liar(stream_info, reader, writer):
        """Answers with a header declaring a terabyte, then zeros for as long as the caller takes them."""
        writer.write(P2P.MESSAGE_MARKER + HUGE.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        try:
            for _ in range(256):
                writer.write(bytes(1 << 20))
                await writer.drain()
                streamed.append(1)
        except (ConnectionError, OSError):
            pass

    async def scenario():
        server, client = await _pair()
        try:
            await server.add_binary_stream_handler("forward", liar)
            started = time.monotonic()
            replies = await BoundedP2P(client).iterate_protobuf_handler(
                server.peer_id, "forward", aiter_list(to_messages(runtime_pb2.ExpertRequest, b"", [])),
                runtime_pb2.ExpertResponse)
            with pytest.raises(FrameTooLong, match=f"a frame of {HUGE} bytes declared"):
                await asyncio.wait_for(from_messages(replies), 30)
            assert time.monotonic() - started < 30
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())
    assert len(streamed) < 256  # the caller closed the stream: the liar could not push its 256 MB through
