"""Pieces of the training step both the swarm trainer and the single-process baseline use."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from swarm.config import OptimizerSpec
from swarm.data.batches import IGNORE_INDEX


def summed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions; divide by the step's target count."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def learning_rate(spec: OptimizerSpec, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to 10%."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(params, spec: OptimizerSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 per row (right padding), as the model computes when none are given."""
    return torch.arange(attention_mask.shape[1]).unsqueeze(0).expand_as(attention_mask).contiguous()
