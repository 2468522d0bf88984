"""Fetching replay snapshots (ChainState.gather_step_state) when a node dies during the fetch: the run goes on
without it, as after any failed call, instead of failing the job (test_chaos once killed a node right then)."""

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
