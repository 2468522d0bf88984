"""A node's record moves only as the node state machine allows; a final state stays."""

from __future__ import annotations

import pytest

from coordinator.membership import Membership, NodeRecord
from swarm.node_state import NodeState, NodeStateError
from swarm.proto import control_pb2 as pb


def _record(state: NodeState = NodeState.JOINED) -> NodeRecord:
    return NodeRecord(node_id="n1", public_key=b"k" * 32, hello=pb.NodeHello(), state=state)


def test_a_record_goes_joined_assigned_ready_leaving_left_from_strings_or_states():
    record = _record()
    for state in ("assigned", NodeState.READY, "leaving", "left"):
        record.state = state
        assert record.state is NodeState(state)


@pytest.mark.parametrize(("start", "state"), [("joined", "ready"), ("ready", "assigned"), ("leaving", "ready")])
def test_a_forbidden_move_raises_and_keeps_the_state(start, state):
    record = _record(NodeState(start))
    with pytest.raises(NodeStateError, match=f"from {start} to {state}"):
        record.state = state
    assert record.state == start


def test_a_final_state_stays_whatever_the_coordinator_or_a_late_message_says():
    for end in (NodeState.FINISHED, NodeState.LEFT, NodeState.FAILED, NodeState.DOWN):
        record = _record(end)
        record.state = NodeState.ASSIGNED  # a range given to a node that went away meanwhile
        record.state = NodeState.FAILED  # a failure message after the coordinator marked it down
        assert record.state is end


def test_a_forbidden_move_through_membership_changes_no_field():
    membership = Membership()
    membership.add(_record())
    with pytest.raises(NodeStateError):
        membership.update("n1", state="ready", failure="never written")
    assert membership.state_of("n1") is NodeState.JOINED and membership.nodes()[0].failure == ""


def test_a_node_in_a_final_state_may_join_again_and_a_live_one_may_not():
    membership = Membership()
    assert membership.add(_record(NodeState.READY)) and not membership.add(_record())
    membership.update("n1", state=NodeState.DOWN)
    assert membership.add(_record()) and membership.state_of("n1") is NodeState.JOINED
