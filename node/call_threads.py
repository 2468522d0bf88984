"""Torch threads per data-plane call: a call over few rows (a generation step, a small micro-batch) runs on one
thread, a larger one on all the node's threads.

A node is given every core when the ranges compute in turn (coordinator.local_nodes.node_threads), and that
pays on a training call's matmuls (3 nodes of llama-1m, batch 32: 0.88x the pretrain step), but on a
call over a handful of rows waking a second thread for each small op costs more than it saves: llama-small,
one new position for 8 rows, generated 220 tokens/s on 2 threads per node against 270 on one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

SMALL_CALL_ROWS = 1024  # rows (batch x positions) below which a call runs on one thread


@contextlib.contextmanager
def threads_for(hidden: torch.Tensor) -> Iterator[None]:
    """Run the block on one thread while inside, if `hidden` (batch x positions x hidden) has few rows."""
    threads = torch.get_num_threads()
    rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else SMALL_CALL_ROWS
    if threads == 1 or rows >= SMALL_CALL_ROWS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
