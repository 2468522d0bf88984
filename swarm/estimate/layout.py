"""A whole run: the volunteers laid out as stages x replicas, and its time, traffic and GPU-hours at each layout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from swarm.estimate.costs import (FlopsPerToken, NodeMemory, blocks_per_node, flops_per_token, link_bytes_per_micro_batch,
                                  averaging_bytes, node_memory)
from swarm.estimate.inputs import NodeSpec, Workload
from swarm.estimate.shape import ModelShape

BITS = (16, 8, 4)
METHODS = ("full", "lora")


@dataclass(frozen=True)
class Estimate:
    """One row: a method at a bit width. Layout, time and share fields are None when one block cannot fit."""

    method: str
    bits: int
    blocks_per_node: int
    min_nodes: int | None
    memory: NodeMemory  # a node as placed (one block when nothing fits)
    flops_per_token: float
    pipeline_depth: int | None = None
    stage_blocks: int | None = None  # blocks one node holds as placed
    replicas: int | None = None
    nodes_used: int | None = None
    short_of_volunteers: bool = False
    micro_batches_per_step: int | None = None
    bytes_per_step_per_link: float | None = None
    seconds_per_step: float | None = None
    seconds_per_step_sequential: float | None = None
    steps: int | None = None
    wall_hours: float | None = None
    gpu_hours_ideal: float | None = None
    gpu_hours_held: float | None = None
    participant: dict = field(default_factory=dict)
    coordinator: dict = field(default_factory=dict)


LAYOUT_SLACK = 1.05  # a layout with fewer nodes within 5 % of the fastest wins: don't hold GPUs for a marginal gain


def estimate(shape: ModelShape, work: Workload, node: NodeSpec, method: str, bits: int) -> Estimate:
    """The run at its best layout of the volunteers into `depth` stages x `replicas` chains.

    Candidates: every replica count the volunteers allow that divides the batch's micro-batches, each at the
    shallowest depth that fits and at the deepest the volunteers allow. The fastest wins, except that a layout
    with fewer nodes within LAYOUT_SLACK of it wins. With fewer volunteers than `min_nodes`, the figures are
    for `min_nodes` nodes and the row says so.
    """
    fit = blocks_per_node(shape, work, node, method, bits)
    flops = flops_per_token(shape, work, method)
    ideal_h = flops.total(shape.layers) * work.tokens / node.flops_per_s / 3600
    if fit == 0:
        return Estimate(method, bits, 0, None, node_memory(shape, work, method, bits, 1), flops.total(shape.layers),
                        gpu_hours_ideal=ideal_h)
    min_nodes = math.ceil(shape.layers / fit)
    if node.volunteers < min_nodes:
        layouts = {(min_nodes, 1)}
    else:
        chains = work.batch // work.micro_batch  # replicas divide the batch, so every layout trains the same batch
        layouts = {(depth, replicas) for replicas in range(1, min(chains, node.volunteers // min_nodes) + 1)
                   if chains % replicas == 0 for depth in (min_nodes, min(shape.layers, node.volunteers // replicas))}
    rows = [_placed(shape, work, node, method, bits, flops, fit, min_nodes, depth, replicas, ideal_h)
            for depth, replicas in layouts]
    fastest = min(row.wall_hours for row in rows)
    return min((row for row in rows if row.wall_hours <= LAYOUT_SLACK * fastest),
               key=lambda row: (row.nodes_used, row.wall_hours))


def _placed(shape: ModelShape, work: Workload, node: NodeSpec, method: str, bits: int, flops: FlopsPerToken,
            fit: int, min_nodes: int, depth: int, replicas: int, ideal_h: float) -> Estimate:
    """Time, traffic and shares of one layout (formulas in docs/ESTIMATES.md)."""
    stage_blocks = math.ceil(shape.layers / depth)
    depth = math.ceil(shape.layers / stage_blocks)  # no idle stage when blocks do not divide evenly
    compute_s = stage_blocks * flops.block * work.micro_tokens / node.flops_per_s
    micro_link = link_bytes_per_micro_batch(shape, work)
    link_s = micro_link / node.link_bytes_per_s + 2 * node.latency_s
    slot_s = max(compute_s, link_s)
    lora = shape.lora_params_per_block(work.lora_rank, work.lora_targets)
    trainable = lora if method == "lora" else shape.block_params
    averaged = averaging_bytes(stage_blocks * trainable * work.wire_bytes, replicas)
    average_s = averaged / node.link_bytes_per_s + 2 * node.latency_s if replicas > 1 else 0.0
    micro_batches = work.batch // (work.micro_batch * replicas)
    step_s = (micro_batches + depth - 1) * slot_s + average_s
    steps = math.ceil(work.tokens / (micro_batches * replicas * work.micro_tokens))
    step_bytes = micro_batches * micro_link + averaged
    wall_h, nodes = steps * step_s / 3600, depth * replicas
    memory = node_memory(shape, work, method, bits, stage_blocks)

    head_params = 2 * shape.vocab * shape.hidden + shape.hidden
    coordinator_bytes = replicas * micro_batches * micro_link
    coordinator = {
        # 16-bit embeddings, norm and head (+ grads, fp32 master and moments in full fine-tuning) + fp32 logits
        "memory_bytes": 2 * head_params + (14 * head_params if method == "full" else 0)
        + 2 * work.micro_tokens * shape.vocab * 4,
        "bytes_per_step": coordinator_bytes,
        "link_bytes_per_s_needed": coordinator_bytes / step_s,
        "tflops_needed": flops.head * micro_batches * replicas * work.micro_tokens / step_s / node.efficiency / 1e12,
    }
    participant = {
        "gpu_hours_held": wall_h,
        "gpu_hours_compute": shape.layers * flops.block * work.tokens / node.flops_per_s / 3600 / nodes,
        "bytes_sent": steps * step_bytes,
        "memory_bytes": memory.total + node.reserved_bytes,
    }
    return Estimate(method, bits, fit, min_nodes, memory, flops.total(shape.layers), pipeline_depth=depth,
                    stage_blocks=stage_blocks, replicas=replicas, nodes_used=nodes,
                    short_of_volunteers=node.volunteers < min_nodes, micro_batches_per_step=micro_batches,
                    bytes_per_step_per_link=step_bytes, seconds_per_step=step_s,
                    seconds_per_step_sequential=micro_batches * depth * (compute_s + link_s) + average_s,
                    steps=steps, wall_hours=wall_h, gpu_hours_ideal=ideal_h, gpu_hours_held=wall_h * nodes,
                    participant=participant, coordinator=coordinator)


def estimate_all(shape: ModelShape, work: Workload, node: NodeSpec) -> list[Estimate]:
    return [estimate(shape, work, node, method, bits) for method in METHODS for bits in BITS]
