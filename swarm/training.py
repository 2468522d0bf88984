"""Pieces of the training step both the swarm trainer and the single-process baseline use."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from swarm.config import OptimizerSpec
from swarm.data.batches import IGNORE_INDEX


def summed_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions; divide by the step's target count.

    `weights` ([batch]) scales each row's tokens: policy-gradient advantages in RL phases.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype).unsqueeze(1)
    return per_token.sum()


def learning_rate(spec: OptimizerSpec, step: int, total_steps: int, peak: float | None = None) -> float:
    """Learning rate of a phase's optimizer step `step` (0-based): linear warmup to `peak` (default
    optimizer.lr), then constant or cosine down to 10% of it."""
    peak = spec.lr if peak is None else peak
    if step < spec.warmup_steps:
        return peak * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return peak
    progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(params, spec: OptimizerSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # AdamW's per-parameter state, saved as `MOMENT/NAME`


def load_adam_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, name: str,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Give `param` (saved as `name`) the AdamW state saved in `tensors`; none saved: fresh state (no step
    applied yet). Used wherever a saved state is taken over: a replica's copy, a step checkpoint."""
    moments = {key: tensors[f"{key}/{name}"] for key in ADAM_MOMENTS if f"{key}/{name}" in tensors}
    if not moments:
        optimizer.state.pop(param, None)
        return
    optimizer.state[param] = {
        "step": moments["step"].reshape(()).float().cpu(),
        "exp_avg": moments["exp_avg"].to(param.device, param.dtype).reshape(param.shape).clone(),
        "exp_avg_sq": moments["exp_avg_sq"].to(param.device, param.dtype).reshape(param.shape).clone(),
    }


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 per row (right padding), as the model computes when none are given."""
    return torch.arange(attention_mask.shape[1]).unsqueeze(0).expand_as(attention_mask).contiguous()
