"""What a shard accepts from a call, checked before anything changes: hidden states, attention masks and position
ids of the right shapes and finite, gradients finite and shaped like what they flow back through, and whole
states (a restore, a replica's state) made of exactly this range's tensors. A refused call must leave the shard
as it was (the fuzz tests hold the node to that), so every check raises ValueError naming the problem first.
"""

from __future__ import annotations

import torch

from swarm.block_range import BlockRange
from swarm.config import PHASE_KINDS
from swarm.training import ADAM_MOMENTS


def check_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        hidden_size: int) -> None:
    """A forward's inputs: finite floating-point [batch, seq, hidden_size] states, a mask and ids [batch, seq]."""
    if hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden states must be [batch, seq, {hidden_size}], got {list(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2] or position_ids.shape != hidden.shape[:2]:
        raise ValueError("attention mask and position ids must be [batch, seq] like the hidden states")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden states must be floating point, got {hidden.dtype}")
    if not torch.isfinite(hidden).all():
        raise ValueError("hidden states contain NaN or inf")


def check_infer_inputs(hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       past_length: int, hidden_size: int) -> None:
    """A generation call's inputs: the new positions' states and ids, and a mask over the session's earlier
    `past_length` positions and the new ones."""
    if hidden.dim() != 3 or hidden.shape[1] == 0:
        raise ValueError(f"hidden states must be [batch, new positions, {hidden_size}], got {list(hidden.shape)}")
    batch, new = hidden.shape[:2]
    if past_length < 0 or tuple(attention_mask.shape) != (batch, past_length + new):
        raise ValueError(f"the attention mask must be [batch, {past_length} + {new}] (earlier and new "
                         f"positions), got {list(attention_mask.shape)}")
    check_hidden_states(hidden, attention_mask[:, past_length:], position_ids, hidden_size)


def check_gradient_finite(grad_output: torch.Tensor) -> None:
    if not torch.isfinite(grad_output).all():
        raise ValueError("gradient contains NaN or inf")


def check_gradient_shape(grad_output: torch.Tensor, output: torch.Tensor) -> None:
    if grad_output.shape != output.shape:
        raise ValueError(f"gradient shape {list(grad_output.shape)} differs from output shape {list(output.shape)}")


def check_restore(own: dict[str, torch.Tensor], tensors: list[torch.Tensor], blocks: BlockRange) -> None:
    """A restore's tensors: one finite floating-point tensor per tensor of `own`, in name order, of its shape."""
    names = sorted(own)
    if len(tensors) != len(names):
        raise ValueError(f"restore takes {len(names)} tensors for blocks {blocks}, got {len(tensors)}")
    for name, tensor in zip(names, tensors):
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"restore: {name} must be {list(own[name].shape)}, got {list(tensor.shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"restore: {name} is not finite floating point")


def check_replica_state(own: dict[str, torch.Tensor], kind: str, tensors: dict[str, torch.Tensor],
                        blocks: BlockRange) -> None:
    """A replica's state (node.shard.Shard.replica_state) for a phase of `kind`: finite floating-point
    parameters (`param/NAME`) of `own`'s names and shapes, every one of them, and AdamW moments of those names."""
    if kind not in PHASE_KINDS:
        raise ValueError(f"unknown phase kind {kind!r}")
    for key, tensor in tensors.items():
        part, _, name = key.partition("/")
        if part not in ("param", *ADAM_MOMENTS) or name not in own:
            raise ValueError(f"replica state {key} is not a tensor of blocks {blocks}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"replica state {key} is not finite floating point")
        if part == "param" and tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"replica state {name} is {list(tensor.shape)}, not {list(own[name].shape)}")
    missing = {f"param/{name}" for name in own} - set(tensors)
    if missing:
        raise ValueError(f"the replica's state lacks {len(missing)} of this range's parameters")
