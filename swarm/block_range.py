"""A contiguous range of transformer blocks: what a node serves, a replica group trains together, a step
checkpoint file holds. Its display format and its group name are defined here once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class BlockRange:
    start: int  # inclusive
    end: int  # exclusive

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        """Inclusive, as people number blocks: 0..2 is blocks 0, 1 and 2."""
        return f"{self.start}..{self.end - 1}"

    @property
    def group(self) -> str:
        """The name the nodes serving this range attest under (assignments and checkpoint files use it too)."""
        return f"blocks-{self.start}-{self.end}"
