"""Research only (`swarm-node join --dishonest MODE`): ways a node can lie, so that replay can be shown to catch
them. Never for real runs.

"hidden-update" nudges its weights inside every step beyond what the gradient asks (and attests the nudged
weights, so its hash chain stays consistent); "wrong-sketch" applies the true gradient but reports the sketch of
another one. The Shard calls `sketched_gradient` and `after_update` in every step; with mode None they change
nothing.
"""

from __future__ import annotations

import torch

DISHONEST_MODES = ("hidden-update", "wrong-sketch")
HIDDEN_UPDATE_SIZE = 1e-3


def check_dishonest_mode(mode: str | None) -> None:
    if mode is not None and mode not in DISHONEST_MODES:
        raise ValueError(f"unknown dishonest mode {mode!r}; choose from {', '.join(DISHONEST_MODES)}")


def sketched_gradient(mode: str | None, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient whose sketch the step reports: the one AdamW uses, unless the node lies about it."""
    return _other_gradient(grads) if mode == "wrong-sketch" else grads


def after_update(mode: str | None, trained: dict[str, torch.nn.Parameter]) -> None:
    """Whatever the node does to its trained weights after AdamW's update and before it attests them."""
    if mode == "hidden-update":
        _hidden_update(trained)


def _hidden_update(trained: dict[str, torch.nn.Parameter]) -> None:
    """A fixed nudge no gradient asked for, the way a node could slip in its own training."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name in sorted(trained):
            if ".lora_A." in name:
                continue  # B (and base weights in pretrain): the update shows in the model's output at once
            noise = torch.randn(trained[name].shape, generator=generator)
            trained[name].add_(HIDDEN_UPDATE_SIZE * noise.sign().to(trained[name].device, trained[name].dtype))


def _other_gradient(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gradient of the same size pointing elsewhere, to report instead of the true one."""
    generator = torch.Generator().manual_seed(4321)
    other = {}
    for name, grad in grads.items():
        noise = torch.randn(grad.shape, generator=generator, dtype=torch.float32).to(grad.device, grad.dtype)
        other[name] = noise * (grad.norm() / noise.norm().clamp_min(1e-12))
    return other
