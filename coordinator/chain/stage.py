"""A replica of a block range as the trainer sees it, and the error for a range with none left."""

from __future__ import annotations

from dataclasses import dataclass, field

from hivemind.p2p import PeerID

from swarm.block_range import BlockRange
from swarm.errors import SwarmError
from swarm.traffic import Traffic


class RangeLostError(SwarmError):
    """Every replica of a block range is gone: the chain cannot go on until a node takes the range over
    (from a step checkpoint: coordinator.step_checkpoint)."""

    def __init__(self, start: int, end: int, detail: str = ""):
        super().__init__(f"blocks {BlockRange(start, end)} lost their last replica" + (f" ({detail})" if detail else ""))
        self.start, self.end = start, end


@dataclass
class RemoteStage:
    """One peer serving one block range (a replica of that range), with what the trainer measured of it."""

    peer_id: PeerID
    start: int
    end: int
    node_id: str
    bytes_sent: int = 0
    bytes_received: int = 0
    # stream ("forward", "backward", "step", "average", ...) -> its traffic; "average" is what the node
    # reports it exchanged with its replicas, the rest is counted here on the wire
    stream_bytes: dict[str, Traffic] = field(default_factory=dict)
    latency_s: float | None = None  # smoothed seconds per forward call
    in_flight: int = 0  # micro-batches routed here whose backward has not returned
    micro_batches: int = 0  # routed here so far
    passed_over: int = 0  # micro-batches its range routed elsewhere since it last got one
    forward_calls: int = 0

    @property
    def range(self) -> tuple[int, int]:
        return self.start, self.end

    @property
    def blocks(self) -> BlockRange:
        return BlockRange(self.start, self.end)

    def count(self, stream: str, sent: int, received: int) -> None:
        self.stream_bytes.setdefault(stream, Traffic()).add(sent, received)

    def __str__(self) -> str:
        return f"node {self.node_id} (blocks {self.blocks})"
