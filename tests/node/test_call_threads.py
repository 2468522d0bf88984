"""node.call_threads: a call over few rows and a step run on one torch thread, a larger forward or backward on
the node's threads, and the node's setting is back after either (also when the call fails)."""

from __future__ import annotations

import pytest
import torch

from node.call_threads import SMALL_CALL_ROWS, threads_for
from swarm.p2p.rpc import STEP
from swarm.proto.blocks_pb2 import CallResult
from tests.node.in_process import apply_step, call, meta, random_work, run, serving, train


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_generation_step_runs_on_one_thread_and_a_training_batch_on_all(two_threads):
    with threads_for(torch.zeros(64, 1, 8)):  # one new position for 64 prompts
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(torch.zeros(32, SMALL_CALL_ROWS // 32, 8)):
        assert torch.get_num_threads() == 2


def test_the_nodes_threads_are_back_after_a_failed_call(two_threads):
    with pytest.raises(ValueError), threads_for(torch.zeros(2, 3, 8)):
        raise ValueError("refused")
    assert torch.get_num_threads() == 2


def test_a_malformed_tensor_keeps_the_nodes_threads(two_threads):
    with threads_for(torch.zeros(5)):  # the shard refuses it; no guess about its rows
        assert torch.get_num_threads() == 2


def test_a_step_runs_on_one_thread_and_the_node_has_its_threads_again_after_it(make_shard, generator):
    seen = []

    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            server.compute.submit(torch.set_num_threads, 2).result()  # the node's setting, on its compute thread
            apply = server.shard.apply_step

            def recorded(*args, **kwargs):
                seen.append(torch.get_num_threads())
                return apply(*args, **kwargs)

            server.shard.apply_step = recorded
            await train(trainer, node, 0, random_work(generator))
            await apply_step(trainer, node, 0)
            refused, _, _ = await call(trainer, node.peer_id, STEP, meta(step=5, learning_rate=0.01))  # no work of it
            assert refused.status == CallResult.ERROR
            seen.append(server.compute.submit(torch.get_num_threads).result())

    run(scenario)
    assert seen == [1, 1, 2], seen
