"""Which replicas serve each block range now: ranges fixed for the chain's life, replicas dropped and adopted
under one lock; the flat stage list is derived from the groups, never kept beside them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from coordinator.chain.stage import RangeLostError, RemoteStage
from swarm.block_range import BlockRange
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.coordinator")


class ReplicaGroups:
    def __init__(self, stages: list[RemoteStage]):
        by_range: dict[tuple[int, int], list[RemoteStage]] = {}
        for stage in stages:
            by_range.setdefault(stage.range, []).append(stage)
        self.ranges = sorted(by_range)  # (start, end) of every range, in block order, with or without replicas
        self.groups = [by_range[key] for key in self.ranges]  # replicas keep their given order
        self.lock = threading.RLock()  # membership here and the routing counters of coordinator.chain.routing
        self._last_drop: dict[tuple[int, int], str] = {}  # range -> why its last dropped replica was dropped
        self.drop_listeners: list[Callable[[RemoteStage, str], None]] = []  # told after a replica is dropped

    @property
    def stages(self) -> list[RemoteStage]:
        """Every replica, range by range."""
        with self.lock:
            return [stage for group in self.groups for stage in group]

    @property
    def replicas(self) -> int:
        """The most replicas any range has: how many micro-batches are worth running at once."""
        with self.lock:
            return max(len(group) for group in self.groups)

    def index_of(self, stage: RemoteStage) -> int:
        if stage.range not in self.ranges:
            raise SwarmError(f"{stage}: the chain has no range {BlockRange(*stage.range)}")
        return self.ranges.index(stage.range)

    def serving(self, index: int) -> list[RemoteStage]:
        """A copy of range `index`'s live replicas; RangeLostError when it has none."""
        with self.lock:
            if not self.groups[index]:
                raise self.lost(index)
            return list(self.groups[index])

    def drop(self, stage: RemoteStage, reason: str) -> None:
        """Take a replica out for good (it died, left or failed a call): it gets no more calls, its part of the
        current step is recomputed on the replicas left, and it is not in the step's sum. Listeners hear of it
        once; a replica already dropped is left alone."""
        with self.lock:
            group = self.groups[self.index_of(stage)]
            if stage not in group:
                return
            group.remove(stage)
            self._last_drop[stage.range] = reason if reason.startswith(str(stage)) else f"{stage}: {reason}"
        logger.warning("%s leaves the chain: %s", stage, reason)
        for listener in self.drop_listeners:
            listener(stage, reason)

    def remove(self, stage: RemoteStage) -> None:
        """Out of its group until it is adopted again (a replica left behind at a step, while it copies)."""
        with self.lock:
            self.groups[self.index_of(stage)].remove(stage)

    def adopt(self, stage: RemoteStage) -> None:
        with self.lock:
            self.groups[self.index_of(stage)].append(stage)

    def lost(self, index: int) -> RangeLostError:
        """The error for range `index` having no replica left, naming why the last one was dropped."""
        start, end = self.ranges[index]
        return RangeLostError(start, end, self._last_drop.get((start, end), ""))

    def name(self, index: int) -> str:
        return str(BlockRange(*self.ranges[index]))
