"""Where a node stands with the coordinator, and which moves between those states are allowed.

A node joins; the coordinator assigns it a block range; it loads the blocks and says it is ready; it may ask
to leave at the next step boundary; it ends finished (told to stop), left (went on its own), failed (said why)
or down (disconnected or silent). The four end states are final: a message a node sends after the
coordinator is done with it changes nothing. The values are the strings the control protocol, the audit log's
`leave` events and the status page have always used, so a `NodeState` compares equal to its string.
"""

from __future__ import annotations

from enum import Enum

from swarm.errors import SwarmError


class NodeStateError(SwarmError):
    """A move between two node states that the state machine does not allow (a bug, not a user error)."""


class NodeState(str, Enum):
    JOINED = "joined"  # authenticated, no range yet (a spare while it stays so)
    ASSIGNED = "assigned"  # sent a block range, loading it
    READY = "ready"  # serving its blocks
    LEAVING = "leaving"  # asked to be taken out of the chain at the next step boundary
    FINISHED = "finished"
    LEFT = "left"
    FAILED = "failed"
    DOWN = "down"

    def __str__(self) -> str:  # the wire string in messages and f-strings, on every Python version
        return self.value

    __hash__ = str.__hash__  # so a NodeState finds its string's entry in a dict or set, and the other way

    @property
    def final(self) -> bool:
        """The coordinator is done with the node: it no longer heartbeats, and no message moves it."""
        return not TRANSITIONS[self]

    @property
    def heartbeats(self) -> bool:
        """A node in this state is connected and sends heartbeats."""
        return not self.final

    def can_become(self, other: NodeState | str) -> bool:
        """Whether a node in this state may move to `other`; staying in a state is no move and always allowed."""
        other = NodeState(other)
        return other is self or other in TRANSITIONS[self]

    def check_move(self, other: NodeState | str) -> NodeState:
        """`other` as a NodeState, or NodeStateError naming both states if the move is not allowed."""
        other = NodeState(other)
        if not self.can_become(other):
            allowed = ", ".join(sorted(TRANSITIONS[self])) or "none: it is final"
            raise NodeStateError(f"a node cannot go from {self} to {other} (allowed from {self}: {allowed})")
        return other


GONE = frozenset({NodeState.LEFT, NodeState.FAILED, NodeState.DOWN})
"""Ended without being told to: it left on its own, failed or went silent. A replica in one of these is dropped
from the chain, and the audit log records a `leave` event for it."""

GONE_OR_LEAVING = GONE | {NodeState.LEAVING}
"""Will serve no (further) steps: gone, or asked to be taken out at the next step boundary. A node loading a
range it has not served yet that is in one of these is given up on."""

_ENDS = GONE | {NodeState.FINISHED}

TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.JOINED: frozenset({NodeState.ASSIGNED}) | _ENDS,
    NodeState.ASSIGNED: frozenset({NodeState.READY}) | _ENDS,
    NodeState.READY: frozenset({NodeState.LEAVING}) | _ENDS,
    NodeState.LEAVING: _ENDS,
    **{end: frozenset() for end in _ENDS},
}
