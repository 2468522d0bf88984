"""Bytes a data-plane stream moved, as one value: what the counting side sent and what it received.

The trainer counts each replica's traffic per stream (`forward`, `backward`, `step`, `average`, `retried`, ...),
a node each step's and each gradient sum's. Metrics rows, the status page and the report carry a stream's
traffic in its JSON form, `{"sent": ..., "received": ...}`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class Traffic:
    """A running count (`add`) or a value (`+`, `-` give new ones, so a total taken now stays as it is)."""

    sent: int = 0
    received: int = 0

    def add(self, sent: int = 0, received: int = 0) -> None:
        self.sent += sent
        self.received += received

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent + other.sent, self.received + other.received)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent - other.sent, self.received - other.received)

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received}

    @classmethod
    def from_dict(cls, moved: Mapping[str, int]) -> Traffic:
        """The JSON form read back; a direction it lacks moved nothing."""
        return cls(moved.get("sent", 0), moved.get("received", 0))


def total_per_stream(counts: Iterable[Mapping[str, Traffic]]) -> dict[str, Traffic]:
    """Per stream, the sum over several counts (the stages of a chain, the rows of a run)."""
    totals: dict[str, Traffic] = {}
    for streams in counts:
        for stream, traffic in streams.items():
            totals[stream] = totals.get(stream, Traffic()) + traffic
    return totals


def carried_between(before: Mapping[str, Traffic], after: Mapping[str, Traffic]) -> dict[str, Traffic]:
    """What each stream carried from totals `before` to totals `after`, by stream name; a stream that carried
    nothing meanwhile is left out."""
    return {stream: now - before.get(stream, Traffic()) for stream, now in sorted(after.items())
            if now != before.get(stream, Traffic())}


def per_stream_json(streams: Mapping[str, Traffic]) -> dict[str, dict[str, int]]:
    return {stream: traffic.as_dict() for stream, traffic in streams.items()}


def per_stream_from_json(streams: Mapping[str, Mapping[str, int]]) -> dict[str, Traffic]:
    return {stream: Traffic.from_dict(moved) for stream, moved in streams.items()}
