"""What the trainer remembers of a node's direct data channel (coordinator.chain.channels.Channels): a refusal for
the run, a node that gave no answer for a while, an answer until its channel cannot be reached."""

from __future__ import annotations

import asyncio
import time

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from coordinator.chain.channels import Channel, Channels
from node.channel_server import ChannelServer
from swarm.p2p.direct import ChannelCredentials
from swarm.p2p.framing import MAX_FRAME_BYTES, FrameTooLong
from swarm.p2p.rpc import CHANNEL, reply_tensor_count
from swarm.p2p.tensors import aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallResult

PEER = PeerID(b"node")


class _Node:
    """Stands in for P2P: answers `channel` with each of `answers` in turn (an exception is raised)."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), 0

    async def iterate_protobuf_handler(self, peer, method, requests, response_type):
        assert method == CHANNEL
        self.asked += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return aiter_list(to_messages(runtime_pb2.ExpertResponse, answer.SerializeToString(), []))


def of(channels: Channels):
    return asyncio.run(channels.of(PEER, 0, 2))


SERVED = CallResult(status=CallResult.OK, channel_host="127.0.0.1", channel_port=4242,
                    channel_certificate=b"pem", channel_token=bytes(32))


def test_a_refusal_is_remembered_for_the_run():
    node = _Node(CallResult(status=CallResult.ERROR, error="this node serves no direct data channel"))
    channels = Channels(node, "job")
    assert of(channels) is None and of(channels) is None and node.asked == 1


def test_a_node_that_gave_no_answer_is_asked_again_after_a_while():
    node = _Node(ConnectionError("no such protocol"), SERVED)
    channels = Channels(node, "job")
    assert of(channels) is None and of(channels) is None and node.asked == 1  # over P2P meanwhile
    channels._ask_again_at[PEER] = time.monotonic() - 1
    channel = of(channels)
    assert isinstance(channel, Channel) and (channel.host, channel.port) == ("127.0.0.1", 4242)
    assert of(channels) is channel and node.asked == 2


def test_an_unreachable_channel_is_not_asked_for_again():
    node = _Node(SERVED)
    channels = Channels(node, "job")
    assert isinstance(of(channels), Channel)
    channels.forget(PEER, ConnectionRefusedError("refused"))
    assert of(channels) is None and node.asked == 1


def test_a_reply_frame_longer_than_any_swarm_frame_closes_the_connection_unread():
    """A node's channel (a real TLS server on 127.0.0.1) answering with one 3 MB message: the trainer refuses
    it at its header (swarm.p2p.framing) and keeps no connection that is out of step."""
    async def oversized(requests, context):
        async for _ in requests:
            pass
        huge = runtime_pb2.Tensor(buffer=bytes(3 << 20), chunks=1, size=[3 << 18], dtype="float32")
        yield runtime_pb2.ExpertResponse(metadata=CallResult(tensor_count=1).SerializeToString(), tensors=[huge])

    async def scenario():
        credentials = ChannelCredentials.generate()
        server = ChannelServer({"forward": oversized}, PEER, None, credentials)
        await server.start("127.0.0.1")
        channel = Channel("127.0.0.1", server.port, credentials.certificate_pem, credentials.token)
        try:
            replies = await channel.call("forward", to_messages(runtime_pb2.ExpertRequest, b"", []))
            with pytest.raises(FrameTooLong, match=f"a frame of [0-9]+ bytes declared; no swarm frame is longer "
                                                   f"than {MAX_FRAME_BYTES}"):
                await asyncio.wait_for(from_messages(replies, tensor_count=reply_tensor_count), 30)
            assert channel.idle == []
        finally:
            channel.close()
            await server.close()

    asyncio.run(scenario())
