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
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

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
    """Run the calling thread on one torch thread while inside, then give it its threads back. Other threads
    keep theirs, also one whose first torch op falls inside (see `_ThreadLocalCount`)."""
    threads = torch.get_num_threads()  # also torch's lazy per-thread set-up, which would undo a count set before it
    if threads == 1:
        yield
        return
    counts = _thread_local_count() or _PROCESS_COUNT
    before = counts.set(1)
    try:
        yield
    finally:
        counts.restore(threads, before)


class _ProcessCount:
    """torch.set_num_threads, for builds without the per-thread setters: it also sets what a thread takes at its
    first parallel op (the race `_ThreadLocalCount` avoids)."""

    def set(self, threads: int) -> int:
        torch.set_num_threads(threads)
        return 0

    def restore(self, threads: int, before: int) -> None:
        torch.set_num_threads(threads)


_PROCESS_COUNT = _ProcessCount()


class _ThreadLocalCount:
    """The calling thread's thread count in torch's OpenMP runtime and in MKL, without torch's process-wide one.

    torch.set_num_threads also sets the count a thread takes at its first parallel op, for good: a thread of the
    node's event loop or the trainer's that started computing while a call ran on one thread would stay on one
    thread for the life of the process, and a sum over a large tensor comes out differently on one thread than
    on two, so what a run computes would depend on timing. The per-thread setters are those torch's own
    set_num_threads calls (omp_set_num_threads, MKL's local count); found through libtorch_cpu, so the OpenMP
    runtime is the one torch is linked to.
    """

    def __init__(self, library: ctypes.CDLL):
        self._omp_set = library.omp_set_num_threads
        self._omp_set.argtypes, self._omp_set.restype = [ctypes.c_int], None
        self._mkl_set = library.MKL_Set_Num_Threads_Local
        self._mkl_set.argtypes, self._mkl_set.restype = [ctypes.c_int], ctypes.c_int
        self._mkl_max = library.MKL_Get_Max_Threads
        self._mkl_max.argtypes, self._mkl_max.restype = [], ctypes.c_int

    def set(self, threads: int) -> int:
        """Set the calling thread's count; MKL's local count before (0: none, the process's)."""
        self._omp_set(threads)
        return self._mkl_set(threads)

    def restore(self, threads: int, before: int) -> None:
        """Give the calling thread `threads` again, and MKL the local count `set` returned."""
        self._omp_set(threads)
        self._mkl_set(before)

    def works(self) -> bool:
        """Whether setting one thread here shows in torch and in MKL."""
        threads = torch.get_num_threads()
        before = self.set(1)
        try:
            return torch.get_num_threads() == 1 and self._mkl_max() == 1
        finally:
            self.restore(threads, before)


@functools.cache
def _thread_local_count() -> _ThreadLocalCount | None:
    """The per-thread setters where this torch build has them (Linux wheels with OpenMP and MKL), else None
    (`_ProcessCount` then)."""
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if not (openmp and torch.backends.mkl.is_available() and library.exists()):
        return None
    try:
        local = _ThreadLocalCount(ctypes.CDLL(str(library)))
    except (OSError, AttributeError):
        return None
    return local if local.works() else None
