"""Torch threads per data-plane call: a call over few rows (a generation step, a small micro-batch) and a step
run on one thread, a larger forward or backward on all the node's threads.

A node is given every core when the ranges compute in turn (coordinator.local_nodes.node_threads), and that
pays on a training call's matmuls (3 nodes of llama-1m, batch 32: 0.88x the pretrain step), but on a
call over a handful of rows waking a second thread for each small op costs more than it saves: llama-small,
one new position for 8 rows, generated 220 tokens/s on 2 threads per node against 270 on one. A step (AdamW over
the trained parameters, the state's hashes, the gradient sketch) is small ops too, and every range steps at
once, so on shared cores a second thread per node only contends: the main job's pretrain step call took 29 ms
on one thread against 49 on two (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SMALL_CALL_ROWS = 1024  # rows (batch x positions) below which a call runs on one thread


@contextlib.contextmanager
def threads_for(hidden: torch.Tensor) -> Iterator[None]:
    """Run the block on one thread while inside, if `hidden` (batch x positions x hidden) has few rows."""
    rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else SMALL_CALL_ROWS
    if rows >= SMALL_CALL_ROWS:
        yield
        return
    with one_thread():
        yield


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one torch thread while inside, then give the node its threads back."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
