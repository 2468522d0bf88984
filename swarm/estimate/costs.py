"""Per-block costs: a node's memory for the blocks it holds, FLOPs per token, and bytes on a stage link or
spent averaging replicas. Closed forms, each written down in docs/ESTIMATES.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.estimate.inputs import NodeSpec, Workload
from swarm.estimate.shape import ModelShape

SIDEBAND_BYTES_PER_TOKEN = 16  # attention mask + position ids, int64 each, sent with every forward call


@dataclass(frozen=True)
class NodeMemory:
    weights: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations


def weight_bytes(params: int, bits: int) -> float:
    return params * bits / 8


def node_memory(shape: ModelShape, work: Workload, method: str, bits: int, blocks: int) -> NodeMemory:
    """Memory of a node holding `blocks` blocks for one micro-batch in flight.

    Linear weights at `bits` (quantization constants left out, ~3 % for NF4 with double quantization), norms
    at 16 bits. LoRA: fp32 adapters, fp32 grads, AdamW's two fp32 moments. Full: 16-bit grads of every
    weight, fp32 master copy and two fp32 moments (the 16 bytes/parameter of mixed-precision AdamW at 16 bits).
    Activations: see ModelShape.activation_elements_per_token; with recomputation a block keeps only its input
    (hidden values per token) and one block at a time holds its full set during backward.
    """
    weights = blocks * (weight_bytes(shape.block_linear_params, bits) + weight_bytes(shape.block_norm_params, 16))
    if method == "lora":
        lora = blocks * shape.lora_params_per_block(work.lora_rank, work.lora_targets)
        adapters, gradients, optimizer = 4 * lora, 4 * lora, 8 * lora
    else:
        adapters, gradients, optimizer = 0, 2 * blocks * shape.block_params, 12 * blocks * shape.block_params
    rank, targets = (work.lora_rank, work.lora_targets) if method == "lora" else (0, ())
    full_block = shape.activation_elements_per_token(rank, targets) * work.micro_tokens * work.activation_bytes
    if work.recompute:
        activations = blocks * shape.hidden * work.micro_tokens * work.activation_bytes + full_block
    else:
        activations = blocks * full_block
    return NodeMemory(weights, adapters, gradients, optimizer, activations)


def blocks_per_node(shape: ModelShape, work: Workload, node: NodeSpec, method: str, bits: int) -> int:
    """Most blocks whose memory fits in the node after its reserve (memory is affine in the block count)."""
    usable = node.memory_bytes - node.reserved_bytes
    one, two = (node_memory(shape, work, method, bits, n).total for n in (1, 2))
    per_block, fixed = two - one, 2 * one - two
    return max(0, min(shape.layers, math.floor((usable - fixed) / per_block)))


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token: one block (linears + attention scores) and the trainer's LM head."""

    block: float
    head: float

    def total(self, layers: int) -> float:
        return layers * self.block + self.head


def flops_per_token(shape: ModelShape, work: Workload, method: str) -> FlopsPerToken:
    """A linear of n weights costs 2n FLOPs per token forward, 2n for the input grad, 2n for the weight grad.

    Full: 6 N. LoRA: the frozen base needs forward and input grads only, 4 N, plus 6 per adapter parameter.
    Attention scores and their use (QK^T, AV) add 4 s h forward per token and block, twice that backward
    (PaLM's 12 L s h accounting; no weights, so the same for both methods). The head on the trainer: 2 V h
    forward, 2 V h for the hidden-state grad, and 2 V h weight grad in full fine-tuning only. Recomputation
    repeats each block's forward. Embedding lookups, norms and element-wise ops are left out (<1 %).
    """
    attention = 4 * work.seq * shape.hidden
    if method == "full":
        forward = 2 * shape.block_linear_params + attention
        block, head = 6 * shape.block_linear_params + 3 * attention, 6 * shape.vocab * shape.hidden
    else:
        lora = shape.lora_params_per_block(work.lora_rank, work.lora_targets)
        forward = 2 * shape.block_linear_params + 2 * lora + attention
        block, head = 4 * shape.block_linear_params + 6 * lora + 3 * attention, 4 * shape.vocab * shape.hidden
    return FlopsPerToken(block + (forward if work.recompute else 0), head)


def boundary_bytes(tokens: int, hidden: int, wire_bytes: int) -> int:
    """Hidden states (or their grads) of `tokens` tokens crossing one stage boundary in one direction."""
    return tokens * hidden * wire_bytes


def link_bytes_per_micro_batch(shape: ModelShape, work: Workload) -> int:
    """What one node sends per micro-batch: its output hidden states forward (with mask and positions) and
    the grad of its input backward. No weight gradients cross stage links, for LoRA or full fine-tuning."""
    activations = boundary_bytes(work.micro_tokens, shape.hidden, work.wire_bytes)
    return 2 * activations + SIDEBAND_BYTES_PER_TOKEN * work.micro_tokens


def averaging_bytes(tensor_bytes: float, replicas: int) -> float:
    """Bytes one replica sends to sum `tensor_bytes` with the others (node.replica_reduce, as hivemind's):
    reduce-scatter and all-gather each send (R-1)/R of the tensor."""
    return 2 * (replicas - 1) / replicas * tensor_bytes if replicas > 1 else 0.0
