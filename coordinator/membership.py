"""Who has joined: authenticated nodes, their state, assignment and last heartbeat."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from swarm.block_range import BlockRange
from swarm.node_state import NodeState
from swarm.proto import control_pb2 as pb

logger = logging.getLogger(__name__)

HEARTBEAT_MISSES = 3  # a node silent for this many heartbeat intervals is down


def heartbeat_timeout_s(interval_s: float) -> float:
    return HEARTBEAT_MISSES * interval_s


@dataclass
class NodeRecord:
    """What the coordinator knows of one node.

    `state` is a NodeState (a string is converted) and moves only as swarm.node_state.TRANSITIONS allows,
    else NodeStateError. A final state stays: a move decided before the coordinator heard that the node went
    down, failed, left or finished (a range assigned to a node that disconnected meanwhile, a `ready` or
    `leave` that crossed the coordinator's `finish`) changes nothing.
    """

    node_id: str
    public_key: bytes
    hello: pb.NodeHello
    outbox: queue.Queue = field(default_factory=queue.Queue)
    state: NodeState = NodeState.JOINED
    blocks: BlockRange | None = None
    ready: pb.NodeReady | None = None
    failure: str = ""
    last_heartbeat: float = field(default_factory=time.monotonic)
    memory: pb.Heartbeat | None = None  # the last heartbeat heard: current and peak memory of the node
    joined_at: float = field(default_factory=time.time)

    def __setattr__(self, name: str, value) -> None:
        if name == "state":
            current = self.__dict__.get("state")  # None while the dataclass's __init__ sets the first state
            if current is not None and current.final:
                logger.debug("node %s stays %s (not %s)", self.node_id, current, value)
                return
            value = NodeState(value) if current is None else current.check_move(value)
        super().__setattr__(name, value)

    def send(self, **kind) -> None:
        self.outbox.put(pb.CoordinatorMessage(**kind))


class Membership:
    def __init__(self) -> None:
        self._nodes: dict[str, NodeRecord] = {}
        self._changed = threading.Condition()

    def add(self, record: NodeRecord) -> bool:
        """Register an authenticated node; False if a node with the same key is already connected."""
        with self._changed:
            existing = self._nodes.get(record.node_id)
            if existing is not None and not existing.state.final:
                return False
            self._nodes[record.node_id] = record
            self._changed.notify_all()
            return True

    def update(self, node_id: str, **changes) -> None:
        """Change fields of a node's record; a forbidden state move raises NodeStateError before any change."""
        with self._changed:
            record = self._nodes[node_id]
            if "state" in changes:
                record.state = changes.pop("state")
            for name, value in changes.items():
                setattr(record, name, value)
            self._changed.notify_all()

    def nodes(self, *states: NodeState | str) -> list[NodeRecord]:
        with self._changed:
            return [r for r in self._nodes.values() if not states or r.state in states]

    def state_of(self, node_id: str) -> NodeState | None:
        with self._changed:
            record = self._nodes.get(node_id)
            return None if record is None else record.state

    def wait_until(self, predicate, timeout: float) -> bool:
        """Wait until predicate(self) holds; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def settle_liveness(self, timeout_s: float) -> list[str]:
        """Wait until every node that should be heartbeating has heartbeated since this call or been silent for
        `timeout_s`; mark the silent ones down and return their ids.

        A job that fails because a node died usually fails faster than its heartbeats time out; settling first
        lets the record of a failed run (audit `leave`, status page) say which nodes were gone.
        """
        start = time.monotonic()
        with self._changed:
            while True:
                now = time.monotonic()
                active = [r for r in self._nodes.values() if r.state.heartbeats]
                if all(r.last_heartbeat > start or now - r.last_heartbeat > timeout_s for r in active):
                    break
                self._changed.wait(0.1)
            silent = [r for r in active if now - r.last_heartbeat > timeout_s]
            for record in silent:
                record.state = NodeState.DOWN
                record.failure = f"no heartbeat for {now - record.last_heartbeat:.1f} s"
            self._changed.notify_all()
            return [record.node_id for record in silent]
