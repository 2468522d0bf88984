"""What the trainer remembers of a node's direct data channel (coordinator.chain.channels.Channels): a refusal for
the run, a node that gave no answer for a while, an answer until its channel cannot be reached."""

from __future__ import annotations

import asyncio
import time

from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from coordinator.chain.channels import Channel, Channels
from swarm.p2p.rpc import CHANNEL
from swarm.p2p.tensors import aiter_list, to_messages
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
