"""Torch threads per call: a call with little arithmetic (a generation step of a small model) and a step
run on one thread, a call with more on all the process's threads.

A node is given every core when the ranges compute in turn (coordinator.local_nodes.node_threads), and that pays
on a training call's matmuls (3 nodes of llama-1m, batch 32: 0.88x the pretrain step), but on a call of a few
milliseconds waking a second thread for each small op costs more than it saves: llama-small, one new position for
8 rows, generated 220 tokens/s on 2 threads per node against 270 on one. What decides is the call's arithmetic,
not its rows: SmolLM2-135M's training call over 8 x 44 rows through 10 blocks does about 490x that generation
step's multiply-adds, and run on one thread (a rule of "under 1,024 rows") it made the nodes' compute 1.5-1.6x
one process's for the same steps. So a call's size is rows x the range's weights (each weight is one multiply-add
per row in a linear layer; attention's share is left out). A step (AdamW over the trained parameters, the state's
hashes, the gradient sketch) is small ops too, and every range steps at once, so on shared cores a second thread
per node only contends: the main job's pretrain step call took 29 ms on one thread against 49 on two
(docs/BENCHMARKS.md). The trainer decodes by the same rule (coordinator.generation): a decoding step's own
arithmetic is its head over one new position per prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Multiply-adds below which a call runs on one thread: a few milliseconds of one core. Between the measured
# cases: llama-small's 8-row generation step on 4 blocks (25M, faster on one thread) and llama-1m's training
# call on one block (671M) or SmolLM2's 8-row generation step on 10 blocks (283M), faster on two.
SMALL_CALL_MULTIPLY_ADDS = 64_000_000


def call_multiply_adds(hidden: torch.Tensor, range_weights: int) -> int | None:
    """About how many multiply-adds a call over `hidden` (batch x positions x hidden) costs a range of
    `range_weights` weights; None for a tensor of another shape (the shard refuses it)."""
    if hidden.dim() != 3:
        return None
    return hidden.shape[0] * hidden.shape[1] * range_weights


def threads_for(hidden: torch.Tensor, range_weights: int) -> contextlib.AbstractContextManager[None]:
    """Run the call on one thread while inside if its arithmetic is small (`call_multiply_adds`)."""
    return threads_for_work(call_multiply_adds(hidden, range_weights))


@contextlib.contextmanager
def threads_for_work(multiply_adds: int | None) -> Iterator[None]:
    """One thread while inside for work of fewer than SMALL_CALL_MULTIPLY_ADDS multiply-adds (None: unknown,
    left as set)."""
    if multiply_adds is None or multiply_adds >= SMALL_CALL_MULTIPLY_ADDS:
        yield
        return
    with one_thread():
        yield


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread while inside, then give the caller its threads back."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
