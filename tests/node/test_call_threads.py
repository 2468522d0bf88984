"""swarm.call_threads: a call with little arithmetic and a step run on one torch thread, a call with more on the
node's threads, and the node's setting is back after either (also when the call fails)."""

from __future__ import annotations

import threading

import pytest
import torch

from swarm import call_threads
from swarm.call_threads import SMALL_CALL_MULTIPLY_ADDS, one_thread, threads_for
from swarm.p2p.rpc import FORWARD, STEP
from swarm.proto.blocks_pb2 import CallResult
from tests.node.in_process import apply_step, call, meta, random_work, run, serving, train

SMALL_RANGE = 3_000_000  # weights of 4 llama-small blocks
LARGE_RANGE = 35_000_000  # of 10 SmolLM2-135M blocks


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_small_models_generation_step_runs_on_one_thread_and_its_training_batch_on_all(two_threads):
    with threads_for(torch.zeros(8, 1, 8), SMALL_RANGE):  # one new position for 8 prompts
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(torch.zeros(8, 44, 8), SMALL_RANGE):
        assert torch.get_num_threads() == 2


def test_a_larger_range_runs_even_a_few_rows_on_all_threads(two_threads):
    """What decides is the arithmetic: 8 rows through 10 blocks of a 135M model are worth a second thread, and
    so is a training batch under 1,024 rows (once run on one thread, which cost SmolLM2's nodes 1.5x)."""
    with threads_for(torch.zeros(8, 1, 8), LARGE_RANGE):
        assert torch.get_num_threads() == 2
    with threads_for(torch.zeros(8, 44, 8), LARGE_RANGE):
        assert torch.get_num_threads() == 2
    rows = SMALL_CALL_MULTIPLY_ADDS // LARGE_RANGE  # just under the bound
    with threads_for(torch.zeros(rows, 1, 8), LARGE_RANGE):
        assert torch.get_num_threads() == 1


def test_the_nodes_threads_are_back_after_a_failed_call(two_threads):
    with pytest.raises(ValueError), threads_for(torch.zeros(2, 3, 8), SMALL_RANGE):
        raise ValueError("refused")
    assert torch.get_num_threads() == 2


def test_a_malformed_tensor_keeps_the_nodes_threads(two_threads):
    with threads_for(torch.zeros(5), SMALL_RANGE):  # the shard refuses it; no guess about its rows
        assert torch.get_num_threads() == 2


def test_a_thread_that_starts_computing_while_another_is_on_one_thread_keeps_the_processs_threads(two_threads):
    """A thread's first parallel op fixes its count for good: taken inside another thread's one-thread window
    from torch.set_num_threads, it left e.g. the node's event loop on one thread for the process's life."""
    inside, done, seen = threading.Event(), threading.Event(), []

    def holder():
        with one_thread():
            inside.set()
            done.wait(timeout=30)

    def newcomer():
        torch.ones(100_000).sum()  # its first parallel op
        seen.append(torch.get_num_threads())

    held = threading.Thread(target=holder)
    held.start()
    assert inside.wait(timeout=30)
    late = threading.Thread(target=newcomer)
    late.start()
    late.join()
    done.set()
    held.join()
    assert seen == [2], seen


def test_work_inside_runs_on_one_thread(two_threads):
    """A sum over a large tensor splits by thread: inside, it is the one-thread sum to the bit."""
    values = torch.randn(8_000_000, generator=torch.Generator().manual_seed(0))
    on_two = values.sum().item()
    torch.set_num_threads(1)
    on_one = values.sum().item()
    torch.set_num_threads(2)
    assert on_one != on_two  # else this tensor cannot tell them apart
    with one_thread():
        assert values.sum().item() == on_one
    assert values.sum().item() == on_two


def test_without_the_per_thread_setters_the_process_count_is_set_and_given_back(two_threads, monkeypatch):
    """A torch build without OpenMP and MKL's per-thread counts (macOS, other BLAS) falls back to
    torch.set_num_threads."""
    monkeypatch.setattr(call_threads, "_thread_local_count", lambda: None)
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_server_sizes_a_forward_call_by_its_rows_times_the_ranges_weights(make_shard, generator, monkeypatch):
    """The bound set just above and just at the call's multiply-adds: one thread, then all of them."""
    seen = []

    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            server.compute.submit(torch.set_num_threads, 2).result()
            forward = server.shard.forward

            def recorded(*args, **kwargs):
                seen.append(torch.get_num_threads())
                return forward(*args, **kwargs)

            server.shard.forward = recorded
            inputs = random_work(generator)[0][0]
            work = inputs[0].shape[0] * inputs[0].shape[1] * server.shard.blocks.weight_count
            for bound in (work + 1, work):
                monkeypatch.setattr(call_threads, "SMALL_CALL_MULTIPLY_ADDS", bound)
                result, _, _ = await call(trainer, node.peer_id, FORWARD, meta(step=0, train=False), inputs)
                assert result.status == CallResult.OK, result.error

    run(scenario)
    assert seen == [1, 2], seen


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
