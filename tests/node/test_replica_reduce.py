"""Summing a replica group's gradients: the flat layout, the order of the sum, and GradientReducer between
BlockServers in process (tests.node.in_process): every replica ends with the same bits."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
import torch
from hivemind.proto import runtime_pb2

from node.replica_reduce import ReduceError
from swarm.audit.attestation import SignedAttestation
from swarm.p2p.codecs import CODECS
from swarm.p2p.replica_sum import flatten_gradient, group_sum, split_parts, sum_contributions, unflatten_gradient
from swarm.p2p.rpc import AVERAGE
from swarm.proto.blocks_pb2 import CallResult
from tests.conftest import random_seed
from tests.node.conftest import train_micro_batch
from tests.node.in_process import LocalP2P, apply_step, call, meta, random_work, run, serving, train


def test_a_gradient_is_flattened_in_name_order_and_unflattened_back():
    gradient = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([10.0, 11.0]), "c": torch.tensor([[7.0]])}
    flat = flatten_gradient(gradient)
    assert flat.tolist() == [10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    assert torch.equal(flat, flatten_gradient(dict(reversed(list(gradient.items())))))
    back = unflatten_gradient(flat, gradient)
    assert all(torch.equal(back[name], value) for name, value in gradient.items())
    with pytest.raises(ValueError, match="has 8 values, not 9"):
        unflatten_gradient(flat[:-1], gradient)


def test_parts_are_cut_evenly_and_added_up_in_replica_order():
    assert [part.tolist() for part in split_parts(torch.arange(7.0), 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    # float32 addition is not associative: (1e8 + 1) - 1e8 == 0 but (1e8 - 1e8) + 1 == 1
    big, one = torch.tensor([1e8]), torch.tensor([1.0])
    assert sum_contributions([big, one, -big], CODECS["none"])[1].item() == 0.0
    assert sum_contributions([big, -big, one], CODECS["none"])[1].item() == 1.0


@contextlib.asynccontextmanager
async def replicas(make_shard, network, trainer, count: int):
    """`count` served replicas of the same range; their servers and P2Ps."""
    async with contextlib.AsyncExitStack() as stack:
        served = [await stack.enter_async_context(serving(make_shard(), network, f"replica{i}", trainer))
                  for i in range(count)]
        yield [server for server, _ in served], [p2p for _, p2p in served]


@pytest.mark.parametrize("codec", ["none", "uniform8bit"])
def test_replicas_end_with_the_same_sum_in_group_order_whatever_order_they_start_in(make_shard, codec):
    draw = random.Random(random_seed("replica start order"))
    gradients = [torch.randn(1001, generator=torch.Generator().manual_seed(draw.getrandbits(32))) for _ in range(3)]

    async def scenario(network, trainer):
        async with replicas(make_shard, network, trainer, 3) as (servers, p2ps):
            peers = [p2p.peer_id for p2p in p2ps]

            async def reduce(index: int):
                await asyncio.sleep(draw.random() / 50)
                return await servers[index].reducer.reduce(0, peers, codec, gradients[index], timeout=30)

            results = await asyncio.gather(*(reduce(i) for i in draw.sample(range(3), 3)))
            expected = group_sum(gradients, CODECS[codec])
            assert all(torch.equal(result.gradient, expected) for result in results)
            assert all(result.bytes_sent > 0 and result.bytes_received > 0 for result in results)

    run(scenario)


def test_a_replica_that_sends_nothing_is_named_when_the_sum_times_out(make_shard):
    async def scenario(network, trainer):
        async with replicas(make_shard, network, trainer, 2) as (servers, p2ps):
            peers = [p2p.peer_id for p2p in p2ps]
            with pytest.raises(ReduceError, match=f"no part from {peers[1]}"):
                await servers[0].reducer.reduce(0, peers, "none", torch.zeros(10), timeout=0.2)

    run(scenario)


def test_a_part_is_refused_from_a_peer_outside_the_group_or_for_a_step_already_summed(make_shard):
    async def scenario(network, trainer):
        async with replicas(make_shard, network, trainer, 2) as (servers, p2ps):
            peers = [p2p.peer_id for p2p in p2ps]
            group = [peer.to_base58() for peer in peers]
            part = meta(step=0, part_index=0, sender_index=1, replica_peers=group)
            stranger = LocalP2P(network, "stranger")
            result, _, _ = await call(stranger, peers[0], AVERAGE, part, [torch.zeros(5)])
            assert result.status == CallResult.ERROR and "is not replica 1 of the group" in result.error
            await asyncio.gather(*(server.reducer.reduce(0, peers, "none", torch.zeros(10), timeout=30)
                                   for server in servers))
            late = meta(step=0, part_index=0, sender_index=1, replica_peers=group[::-1])
            result, _, _ = await call(p2ps[1], peers[0], AVERAGE, late, [torch.zeros(5)])
            assert result.status == CallResult.ERROR and "already stepped past it" in result.error

    run(scenario)


def test_replicas_stepping_together_equal_one_node_doing_all_their_micro_batches(make_shard, generator):
    work = random_work(generator, micro_batches=(0, 1))
    alone = make_shard()
    for micro, (inputs, grad) in work.items():
        train_micro_batch(alone, 0, micro, inputs, grad)
    alone.apply_step(0, 0.01)

    async def scenario(network, trainer):
        async with replicas(make_shard, network, trainer, 2) as (servers, p2ps):
            for micro, p2p in enumerate(p2ps):
                await train(trainer, p2p, 0, {micro: work[micro]})
            group = {"replica_peers": [p2p.peer_id.to_base58() for p2p in p2ps],
                     "replica_nodes": [server.identity.fingerprint for server in servers]}
            results = await asyncio.gather(*(apply_step(trainer, p2p, 0, **group) for p2p in p2ps))
            attestations = [SignedAttestation(r.attestation, r.signature).attestation for r in results]
            assert all(server.shard.state_hashes() == alone.state_hashes() for server in servers)
            assert attestations[0].gradient_sketch == attestations[1].gradient_sketch
            assert attestations[0].local_gradient_sketch != attestations[1].local_gradient_sketch
            assert all(a.averaged_with == tuple(group["replica_nodes"]) for a in attestations)
            assert all(r.averaging_bytes_sent > 0 and r.averaging_bytes_received > 0 for r in results)

    run(scenario)


def test_a_replica_whose_sum_never_ends_is_named_at_the_replies_limit(make_shard):
    async def endless_sum(requests, context):
        """A lying replica: an OK reply announcing one tensor in a million 1 MB chunks, sent while it is read."""
        async for _ in requests:
            pass
        first = runtime_pb2.Tensor(buffer=bytes(1 << 20), chunks=1_000_000, size=[1_000_000, 1 << 18],
                                   dtype="float32")
        yield runtime_pb2.ExpertResponse(metadata=CallResult(tensor_count=1).SerializeToString(), tensors=[first])
        for _ in range(100):
            yield runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(buffer=bytes(1 << 20))])

    async def scenario(network, trainer):
        async with replicas(make_shard, network, trainer, 2) as (servers, p2ps):
            peers = [p2p.peer_id for p2p in p2ps]
            network[peers[1]][AVERAGE] = endless_sum
            with pytest.raises(ReduceError, match=f"replica {peers[1]} answered part 1 of step 0: the summed part "
                                                  "is larger than its limit of [0-9]+ bytes"):
                await servers[0].reducer.reduce(0, peers, "none", torch.zeros(10), timeout=30)

    run(scenario)
