"""node.call_threads: a call over few rows runs on one torch thread, a larger one on the node's threads, and the
node's setting is back after either (also when the call fails)."""

from __future__ import annotations

import pytest
import torch

from node.call_threads import SMALL_CALL_ROWS, threads_for


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
