"""The decoder layers of one block range, built alone: a node never instantiates the whole model."""

from __future__ import annotations

import torch
from torch import nn

from swarm.errors import ModelSourceError
from swarm.models.checkpoint import Checkpoint, tensors_sha256


class BlockStack(nn.Module):
    """Blocks [start, end) of a causal LM.

    Parameters keep their names from the full model (`model.layers.5.self_attn.q_proj.weight`), so LoRA
    adapters trained here have the keys of a standard PEFT adapter for the whole model.
    """

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        if not 0 <= start < end <= checkpoint.num_blocks:
            raise ModelSourceError(f"block range {start}..{end - 1} outside the model's {checkpoint.num_blocks} blocks")
        self.family = checkpoint.family
        self.config = checkpoint.config
        self.start, self.end = start, end
        with torch.device("meta"):
            layers = {str(i): self.family.decoder_layer(self.config, i) for i in range(start, end)}
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict(layers)
        state = checkpoint.load(checkpoint.block_tensor_names(start, end), dtype)
        try:
            self.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ModelSourceError(f"{checkpoint.path}: blocks {start}..{end - 1} do not match config.json: {error}") from None
        self.to(device)
        self.rotary = self.family.rotary_embedding(self.config).to(device)
        self.layer_kinds = self.family.layer_kinds(self.config, range(start, end))
        self.base_sha256 = tensors_sha256(state)
        self.base_bytes = sum(t.numel() * t.element_size() for t in state.values())

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        masks = self.family.attention_masks(self.config, hidden, attention_mask, position_ids)
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for kind, layer in zip(self.layer_kinds, self.model.layers.values()):
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids,
                           position_embeddings=position_embeddings)
        return hidden


class TrainerHead(nn.Module):
    """Embeddings, final norm and LM head: the only parts of the model the trainer holds."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
        super().__init__()
        config = checkpoint.config
        names = checkpoint.trainer_tensor_names()
        tensors = checkpoint.load(list(set(names.values())), dtype)
        self.embed = nn.Embedding.from_pretrained(tensors[names["embed"]], freeze=True)
        self.norm = checkpoint.family.final_norm(config).to(dtype)
        self.norm.weight.data.copy_(tensors[names["norm"]])
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.head.weight.data.copy_(tensors[names["head"]])
        self.requires_grad_(False)
        self.to(device)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))
