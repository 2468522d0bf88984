"""Block placement: which node serves which contiguous range of blocks."""

from __future__ import annotations

from swarm.block_range import BlockRange


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


def place_replicas(num_blocks: int, num_nodes: int, replicas: int | str, stages: int | None,
                   min_nodes: int) -> list[BlockRange | None]:
    """The range of each joined node, in join order (None: a spare, on standby).

    `replicas` R: S = `stages` (default: as many as the nodes allow, up to one block each) ranges with R nodes
    each; the others wait as spares. `auto`: S = `stages` (default: `min_nodes`) ranges, and every node serves
    one, replicas spread as evenly as the nodes allow (earlier ranges take the extra).
    """
    if replicas == "auto":
        count = min(num_blocks, stages or min_nodes, num_nodes)
        used = num_nodes
    else:
        count = min(num_blocks, stages or max(1, num_nodes // replicas))
        used = count * replicas
        if used > num_nodes:
            raise ValueError(f"{count} stages x {replicas} replicas need {used} nodes; {num_nodes} joined")
    ranges = split_blocks(num_blocks, count)
    return [ranges[index % count] if index < used else None for index in range(num_nodes)]
