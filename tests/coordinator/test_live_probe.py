"""Which stage boundary the live probe reads: only where the trainer holds the residual stream (a range's end)."""

from __future__ import annotations

import pytest

from coordinator.live_probe import Boundary, stage_boundary
from swarm.config import parse_job
from swarm.errors import JobFileError
from tests.conftest import job_dict


def test_the_boundary_nearest_the_middle_block_is_chosen_the_lower_of_two_as_near():
    assert stage_boundary([(0, 2), (2, 4), (4, 6)], None) == Boundary(layer=2, blocks=6, range_index=1)
    assert stage_boundary([(0, 3), (3, 6)], None) == Boundary(layer=3, blocks=6, range_index=1)
    assert stage_boundary([(4, 6), (0, 2), (2, 4)], 4) == Boundary(layer=4, blocks=6, range_index=2)


def test_the_last_boundary_is_the_chains_output_and_a_layer_past_it_takes_the_last():
    assert stage_boundary([(0, 4)], None) == Boundary(layer=4, blocks=4, range_index=None)
    assert stage_boundary([(0, 2), (2, 4)], 9) == Boundary(layer=4, blocks=4, range_index=None)


def test_a_probe_without_evaluation_is_refused_with_a_message_naming_both():
    with pytest.raises(JobFileError, match="oversight.probe .* add an eval section"):
        parse_job(job_dict(oversight={"probe": True}))
    assert parse_job(job_dict(oversight={"probe": True}, eval={"samples": 8})).oversight.probe
    with pytest.raises(JobFileError, match="oversight.layer"):
        parse_job(job_dict(oversight={"layer": 0}))
