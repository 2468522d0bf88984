"""What is trained (the workload) and on what (one volunteer node): the estimator's inputs besides the model."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.estimate.shape import LORA_TARGETS
from swarm.estimate.units import GIB


@dataclass(frozen=True)
class Workload:
    """What is trained: LoRA settings, sequence shapes, token budget, and what crosses the wire."""

    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seq: int = 512
    tokens: float = 2e7
    micro_batch: int = 1  # sequences per micro-batch
    batch: int = 32  # sequences per optimizer step, a multiple of micro_batch
    recompute: bool = False  # activation checkpointing per block
    activation_bytes: int = 2  # bf16 activations kept for backward
    wire_bytes: int = 2  # activations, activation grads and averaged tensors sent as 16-bit

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.seq


@dataclass(frozen=True)
class NodeSpec:
    """One volunteer: device memory, peak throughput times the achieved fraction (MFU), and its link."""

    memory_bytes: int = 24 * GIB
    tflops: float = 70.0
    efficiency: float = 0.4
    link_bytes_per_s: float = 100e6 / 8
    latency_s: float = 0.05
    volunteers: int = 16
    reserved_bytes: int = GIB  # CUDA context, allocator slack, temporary buffers

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12 * self.efficiency
