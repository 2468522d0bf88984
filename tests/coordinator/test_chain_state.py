"""Whole-state calls (ChainState) when a node dies during them: fetching replay snapshots, starting a phase,
gathering the adapter or a step checkpoint. The run goes on without it, as after any failed call, instead of
failing the job (test_chaos killed a node right then: during a snapshot fetch once, during the first phase's
start under a doubly loaded machine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coordinator.chain.groups import ReplicaGroups
from coordinator.chain.stage import RangeLostError, RemoteStage
from coordinator.chain.state import ChainState
from swarm.errors import SwarmConnectionError


class Transport:
    """Answers STEP_STATE with one tensor per node; the nodes in `dead` fail as a killed peer does."""

    def __init__(self, dead: set[str]):
        self.dead = dead

    def meta(self, stage, **fields):
        return fields

    def call(self, stage, method, meta, tensors=()):
        if stage.node_id in self.dead:
            raise SwarmConnectionError(f"{stage} did not answer")
        return SimpleNamespace(names=["after/w"]), [torch.full((1,), float(stage.start))]


def _stages():
    return [RemoteStage(None, 0, 2, "a1"), RemoteStage(None, 0, 2, "a2"), RemoteStage(None, 2, 4, "b1")]


def test_a_replica_that_dies_while_its_state_is_fetched_is_dropped_and_left_out():
    groups = ReplicaGroups(_stages())
    states = ChainState(Transport({"a2"}), groups, None).gather_step_state(7)
    assert sorted(states) == ["a1", "b1"]
    assert [stage.node_id for stage in groups.stages] == ["a1", "b1"]


def test_the_last_replica_of_a_range_dying_then_loses_the_range():
    groups = ReplicaGroups(_stages())
    with pytest.raises(RangeLostError):
        ChainState(Transport({"b1"}), groups, None).gather_step_state(7)


def test_a_replica_that_dies_as_a_phase_starts_is_dropped_and_its_range_goes_on():
    groups = ReplicaGroups(_stages())
    transport = Transport({"a1"})
    ChainState(transport, groups, None).configure_phase("sft", "sft", "new", "0/0/sft")
    assert [stage.node_id for stage in groups.stages] == ["a2", "b1"]


def test_a_range_whose_only_replica_dies_as_a_phase_starts_is_lost():
    groups = ReplicaGroups(_stages())
    with pytest.raises(RangeLostError):
        ChainState(Transport({"b1"}), groups, None).configure_phase("sft", "sft", "new", "0/0/sft")


@pytest.mark.parametrize("gather", ["gather_adapter", "gather_weights", "gather_replica_states"])
def test_a_gather_asks_the_next_replica_when_the_first_dies(gather):
    groups = ReplicaGroups(_stages())
    gathered = getattr(ChainState(Transport({"a1"}), groups, None), gather)()
    assert len(gathered) == (2 if gather == "gather_replica_states" else 1)  # one tensor name per range here
    assert [stage.node_id for stage in groups.stages] == ["a2", "b1"]
