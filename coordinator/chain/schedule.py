"""Which micro-batches of a step are in flight at once, and the order their gradients reach each replica.

Pipelined (training.pipeline, the default), each replica lane carries up to one micro-batch per range at a
time: while range k computes micro-batch i, range k+1 computes micro-batch i-1. Every micro-batch runs its
backward right after its forward (1F1B-like, not GPipe's all-forwards-then-all-backwards), so a node keeps
the activations of at most one micro-batch per range downstream of it, not of the whole step.

A node adds gradients up in the order its backward calls arrive, and float addition depends on that order.
So micro-batches are routed in micro-batch order, and the backward of micro-batch i at a replica waits until
every earlier micro-batch routed to that replica has finished its backward there: each node accumulates its
micro-batches in ascending order whatever the timing, and with one replica per range the step's result is
exactly that of the sequential schedule. (Which replica takes which micro-batch still follows measured
latency: see coordinator.chain.routing.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from coordinator.chain.stage import RemoteStage
from swarm.errors import SwarmError


class StepAbandoned(SwarmError):
    """Another micro-batch of the step failed: this one stops waiting for its turn (the step is redone)."""


class StepSchedule:
    def __init__(self, micro_batches: int, ranges: int, replicas: int, pipeline: bool):
        lanes = max(1, replicas)
        self.workers = max(1, min(micro_batches, lanes * (ranges if pipeline else 1)))
        self._routes: dict[int, list[RemoteStage]] = {}  # micro-batch -> its replica per range, as first routed
        self._done: list[set[int]] = [set() for _ in range(ranges)]  # per range: micro-batches whose backward returned
        self._failed = False
        self._changed = threading.Condition()

    def route(self, micro_batch: int, pick: Callable[[], list[RemoteStage]]) -> list[RemoteStage]:
        """`pick()`'s route for `micro_batch`, taken after every earlier micro-batch has its route."""
        with self._changed:
            self._wait(lambda: all(j in self._routes for j in range(micro_batch)), micro_batch)
            route = pick()
            self._routes[micro_batch] = list(route)
            self._changed.notify_all()
            return route

    def backward_turn(self, index: int, micro_batch: int) -> _Turn:
        """Context manager around `micro_batch`'s backward at range `index`: waits for the earlier
        micro-batches routed to the same replica, and lets later ones go when it leaves (also on failure)."""
        return _Turn(self, index, micro_batch)

    def fail(self) -> None:
        """A micro-batch failed, so the step will not be applied: no micro-batch waits any more (a waiting
        one raises StepAbandoned), so every thread of the step ends and the failure itself is what is seen."""
        with self._changed:
            self._failed = True
            self._changed.notify_all()

    def _wait(self, ready: Callable[[], bool], micro_batch: int) -> None:
        self._changed.wait_for(lambda: ready() or self._failed)
        if self._failed:
            raise StepAbandoned(f"micro-batch {micro_batch}: another micro-batch of the step failed")

    def _earlier_done(self, index: int, micro_batch: int) -> bool:
        route = self._routes.get(micro_batch)
        if route is None:  # not routed through the schedule: nothing to wait for
            return True
        lane = route[index]
        return all(j in self._done[index] for j in range(micro_batch) if self._routes[j][index] is lane)


class _Turn:
    def __init__(self, schedule: StepSchedule, index: int, micro_batch: int):
        self.schedule, self.index, self.micro_batch = schedule, index, micro_batch

    def __enter__(self) -> None:
        schedule = self.schedule
        with schedule._changed:
            schedule._wait(lambda: schedule._earlier_done(self.index, self.micro_batch), self.micro_batch)

    def __exit__(self, *exc) -> None:
        schedule = self.schedule
        with schedule._changed:
            schedule._done[self.index].add(self.micro_batch)
            schedule._changed.notify_all()
