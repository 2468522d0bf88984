import pytest

from coordinator.scheduler import place_replicas, split_blocks
from swarm.block_range import BlockRange


@pytest.mark.parametrize("blocks, nodes", [(6, 3), (7, 3), (8, 8), (5, 1), (24, 5)])
def test_ranges_are_disjoint_cover_every_block_and_are_balanced(blocks, nodes):
    ranges = split_blocks(blocks, nodes)
    assert ranges[0].start == 0 and ranges[-1].end == blocks
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_more_nodes_than_blocks_is_refused():
    with pytest.raises(ValueError):
        split_blocks(2, 3)
    assert str(BlockRange(2, 4)) == "2..3"


def test_replicas_alternate_over_ranges_and_extra_nodes_wait_as_spares():
    ranges = place_replicas(6, 5, replicas=2, stages=None, min_nodes=4)
    assert ranges == [BlockRange(0, 3), BlockRange(3, 6), BlockRange(0, 3), BlockRange(3, 6), None]
    assert place_replicas(6, 3, replicas=1, stages=None, min_nodes=3) == split_blocks(6, 3)
    assert place_replicas(2, 3, replicas=1, stages=None, min_nodes=1) == [BlockRange(0, 1), BlockRange(1, 2), None]


def test_auto_replicas_use_every_node():
    ranges = place_replicas(6, 5, replicas="auto", stages=2, min_nodes=2)
    assert ranges.count(BlockRange(0, 3)) == 3 and ranges.count(BlockRange(3, 6)) == 2
    with pytest.raises(ValueError, match="need 6 nodes"):
        place_replicas(6, 5, replicas=2, stages=3, min_nodes=4)
