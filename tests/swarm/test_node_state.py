"""The node state machine: its values are the wire strings, and it allows exactly the moves the coordinator makes."""

from __future__ import annotations

import json

import pytest

from swarm.node_state import GONE, GONE_OR_LEAVING, TRANSITIONS, NodeState, NodeStateError
from swarm.proto import control_pb2 as pb


def test_a_state_is_its_wire_string_in_comparisons_dicts_json_fstrings_and_protos():
    assert NodeState.READY == "ready" and NodeState("ready") is NodeState.READY
    assert {"ready": "up"}[NodeState.READY] == "up" and NodeState.DOWN in {"down"}
    assert json.dumps({"state": NodeState.LEFT}) == '{"state": "left"}'
    assert f"{NodeState.FAILED}" == str(NodeState.FAILED) == "failed"
    assert pb.NodeStatus(state=NodeState.ASSIGNED).state == "assigned"


@pytest.mark.parametrize("start", [NodeState.JOINED, NodeState.ASSIGNED, NodeState.READY, NodeState.LEAVING])
@pytest.mark.parametrize("end", [NodeState.FINISHED, NodeState.LEFT, NodeState.FAILED, NodeState.DOWN])
def test_every_live_state_can_end_every_way(start, end):
    assert start.heartbeats and end.final and start.can_become(end)


def test_gone_is_every_end_but_being_told_to_finish_and_gone_or_leaving_adds_leaving():
    assert GONE == {"left", "failed", "down"} and all(state.final for state in GONE)
    assert {state for state in NodeState if state.final} - GONE == {NodeState.FINISHED}
    assert GONE_OR_LEAVING == GONE | {NodeState.LEAVING}
    assert "down" in GONE and None not in GONE_OR_LEAVING  # the wire string, and an unknown node's state_of


@pytest.mark.parametrize(("start", "state"), [("joined", "ready"), ("ready", "assigned"), ("leaving", "ready"),
                                              ("assigned", "leaving"), ("assigned", "joined")])
def test_a_move_the_machine_does_not_allow_raises_and_names_both_states(start, state):
    assert not NodeState(start).can_become(state)
    with pytest.raises(NodeStateError, match=f"from {start} to {state}"):
        NodeState(start).check_move(state)


def test_the_end_states_are_final_and_staying_in_a_state_is_no_move():
    for end in (NodeState.FINISHED, NodeState.LEFT, NodeState.FAILED, NodeState.DOWN):
        assert TRANSITIONS[end] == frozenset() and not end.heartbeats and not end.can_become(NodeState.READY)
    assert all(state.can_become(state) for state in NodeState)
