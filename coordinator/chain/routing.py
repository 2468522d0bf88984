"""Which replica of each range takes a micro-batch: the one expected to answer first, by measured latency and
the calls it already has in flight, so a slow replica gets fewer micro-batches but is still re-measured."""

from __future__ import annotations

from coordinator.chain.groups import ReplicaGroups
from coordinator.chain.stage import RemoteStage

LATENCY_SMOOTHING = 0.3  # weight of the newest measurement in a replica's latency average
PROBE_AFTER = 8  # a replica passed over this many times in a row gets the next micro-batch, to re-measure it


class Router:
    def __init__(self, groups: ReplicaGroups):
        self.groups = groups

    def route(self) -> list[RemoteStage]:
        """One replica per range for a micro-batch."""
        with self.groups.lock:
            return [self.pick(index) for index in range(len(self.groups.ranges))]

    def pick(self, index: int) -> RemoteStage:
        """Range `index`'s replica with the lowest smoothed latency times (calls in flight + 1); an unmeasured
        replica counts as the fastest measured one, and one passed over PROBE_AFTER times in a row goes first
        (a replica measured slow once would otherwise never be measured again). Counts the pick as in flight."""
        with self.groups.lock:
            group = self.groups.serving(index)
            measured = [s.latency_s for s in group if s.latency_s is not None]
            default = min(measured) if measured else 1.0
            starved = [s for s in group if s.passed_over >= PROBE_AFTER]
            chosen = min(starved or group, key=lambda s: ((s.in_flight + 1) * (s.latency_s or default), s.micro_batches))
            for stage in group:
                stage.passed_over = 0 if stage is chosen else stage.passed_over + 1
            chosen.in_flight += 1
            chosen.micro_batches += 1
            return chosen

    def replace(self, index: int, stage: RemoteStage, reason: str) -> RemoteStage:
        """`stage` failed a call: drop it from the chain and pick another replica of range `index` (a range
        with none left raises RangeLostError)."""
        self.groups.drop(stage, reason)
        return self.pick(index)

    def release(self, route: list[RemoteStage]) -> None:
        """The micro-batch routed over `route` is done (or abandoned)."""
        with self.groups.lock:
            for stage in route:
                stage.in_flight = max(0, stage.in_flight - 1)

    def measured(self, stage: RemoteStage, seconds: float) -> None:
        """A forward call took `seconds`; the first one also opened the connection, so it does not count."""
        with self.groups.lock:
            stage.forward_calls += 1
            if stage.forward_calls > 1:
                stage.latency_s = seconds if stage.latency_s is None else \
                    (1 - LATENCY_SMOOTHING) * stage.latency_s + LATENCY_SMOOTHING * seconds

    def reset(self) -> None:
        with self.groups.lock:
            for stage in self.groups.stages:
                stage.in_flight = 0
