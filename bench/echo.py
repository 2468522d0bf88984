"""Echo round trips between two asyncio servers in this process, the floor under every trainer call: over two
hivemind P2P daemons (hivemind's own handler) and over a node's direct data channel (node.channel_server).
Shared by bench/call_times.py and bench/framing.py; importing it starts nothing."""

from __future__ import annotations

import statistics
import time

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from coordinator.chain.channels import Channel
from node.channel_server import ChannelServer
from swarm.p2p.direct import ChannelCredentials
from swarm.p2p.rpc import reply_tensor_count
from swarm.p2p.tensors import aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallResult

WARM_UP_CALLS = 5  # the first calls (connections, allocator pools) are left out of each median
HIDDEN_ELEMENTS = 32 * 48 * 128  # the main job's pretrain hidden states: 32 rows of about 48 tokens, hidden 128


def tensor_label(elements: int) -> str:
    """The key of the tensor's round trip in what the echoes return (the other key: "none")."""
    return f"{elements * 4 / 1e6:.2f} MB"


def _payloads(elements: int) -> tuple[tuple[str, list[torch.Tensor]], ...]:
    return ("none", []), (tensor_label(elements), [torch.randn(elements)])


async def p2p_round_trips(elements: int, calls: int = 30) -> dict[str, float]:
    """Median ms of a stream call echoing `elements` float32 values (and none) between two P2P daemons."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              initial_peers=[str(addr) for addr in await server.get_visible_maddrs()])

    async def echo(requests, context):
        metadata, tensors, _ = await from_messages(requests)
        for message in to_messages(runtime_pb2.ExpertResponse, metadata, tensors):
            yield message

    await server.add_protobuf_handler("echo", echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    medians = {}
    try:
        for label, tensors in _payloads(elements):
            seconds, count = [], len(tensors)
            for _ in range(calls):
                started = time.perf_counter()
                requests = to_messages(runtime_pb2.ExpertRequest, b"", tensors)
                replies = await client.iterate_protobuf_handler(server.peer_id, "echo", aiter_list(requests),
                                                                runtime_pb2.ExpertResponse)
                await from_messages(replies, tensor_count=lambda _, count=count: count)
                seconds.append(time.perf_counter() - started)
            medians[label] = statistics.median(seconds[WARM_UP_CALLS:]) * 1e3
    finally:
        await client.shutdown()
        await server.shutdown()
    return medians


async def channel_round_trips(elements: int, calls: int = 30) -> dict[str, float]:
    """The same echo over a node's direct data channel (TLS, a kept connection)."""
    async def echo(requests, context):
        _, tensors, _ = await from_messages(requests)
        reply = CallResult(tensor_count=len(tensors)).SerializeToString()
        for message in to_messages(runtime_pb2.ExpertResponse, reply, tensors):
            yield message

    credentials = ChannelCredentials.generate()
    server = ChannelServer({"echo": echo}, PeerID(b"bench"), None, credentials)
    await server.start("127.0.0.1")
    channel = Channel("127.0.0.1", server.port, credentials.certificate_pem, credentials.token)
    medians = {}
    try:
        for label, tensors in _payloads(elements):
            seconds = []
            for _ in range(calls):
                started = time.perf_counter()
                replies = await channel.call("echo", to_messages(runtime_pb2.ExpertRequest, b"", tensors))
                await from_messages(replies, tensor_count=reply_tensor_count)
                seconds.append(time.perf_counter() - started)
            medians[label] = statistics.median(seconds[WARM_UP_CALLS:]) * 1e3
    finally:
        channel.close()
        await server.close()
    return medians
