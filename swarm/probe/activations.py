"""Residual-stream activations at the last token of each sequence, after every block of a causal LM.

Block boundary L (1..num_layers) is the output of block L, the residual stream the next block reads (the last
one before the final norm). Sequences are right-padded in batches: under a causal mask a real token attends
to none of the padding after it, and its position is its index, so every activation is the one the sequence
gives alone.
"""

from __future__ import annotations

import numpy as np
import torch

from swarm.models.families import family_of

BATCH = 32


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's blocks, where its family keeps them (a peft model's under its base model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_submodule(family_of(inner.config).layers_prefix)


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, lengths) of one batch, each sequence from column 0 and padded after it."""
    lengths = torch.tensor([len(ids) for ids in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    return ids, mask, lengths


def last_token_residuals(model, sequences: list[list[int]], pad_id: int, batch_size: int = BATCH) -> np.ndarray:
    """[sequences, blocks, hidden] float64: the residual stream after each block at each sequence's last token."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                ids, mask, lengths = right_padded(batch, pad_id)
                captured.clear()
                model(input_ids=ids, attention_mask=mask)
                last = lengths - 1
                picked = [hidden[torch.arange(len(batch)), last] for hidden in captured]
                rows.append(torch.stack(picked, dim=1).double().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return np.concatenate(rows)
