import pytest

from coordinator.scheduler import BlockRange, split_blocks


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
