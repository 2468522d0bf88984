"""Block placement: which node serves which contiguous range of blocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockRange:
    start: int  # inclusive
    end: int  # exclusive

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}..{self.end - 1}"


def split_blocks(num_blocks: int, num_nodes: int) -> list[BlockRange]:
    """Disjoint contiguous ranges covering every block, as even as possible (earlier ranges take the extra)."""
    if not 1 <= num_nodes <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_nodes} nodes")
    base, extra = divmod(num_blocks, num_nodes)
    ranges, start = [], 0
    for index in range(num_nodes):
        end = start + base + (1 if index < extra else 0)
        ranges.append(BlockRange(start, end))
        start = end
    return ranges
