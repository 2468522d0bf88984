"""The decoder layers of one block range, built alone: a node never instantiates the whole model."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from swarm.block_range import BlockRange
from swarm.errors import ModelSourceError
from swarm.models.checkpoint import Checkpoint, tensors_sha256


class BlockStack(nn.Module):
    """Blocks [start, end) of a causal LM.

    Parameters keep their names from the full model (`model.layers.5.self_attn.q_proj.weight`,
    `transformer.h.5.attn.c_attn.weight`), so LoRA adapters trained here have the keys of a standard PEFT
    adapter for the whole model.
    """

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        if not 0 <= start < end <= checkpoint.num_blocks:
            raise ModelSourceError(f"block range {BlockRange(start, end)} outside the model's {checkpoint.num_blocks} blocks")
        self.family = checkpoint.family
        self.config = checkpoint.config
        self.start, self.end = start, end
        with torch.device("meta"):
            layers = nn.ModuleDict({str(i): self.family.decoder_layer(self.config, i) for i in range(start, end)})
        self._attach(self.family.layers_prefix, layers)
        self.layers = list(layers.values())  # a plain list: the modules stay registered under their full names
        state = checkpoint.load(checkpoint.block_tensor_names(start, end), dtype)
        try:
            self.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise ModelSourceError(f"{checkpoint.path}: blocks {BlockRange(start, end)} do not match config.json: {error}") from None
        self.to(device)
        rotary = self.family.rotary_embedding(self.config)
        self.rotary = None if rotary is None else rotary.to(device)
        self.layer_kinds = self.family.layer_kinds(self.config, range(start, end))
        self.base_sha256 = tensors_sha256(state)
        self.base_bytes = sum(t.numel() * t.element_size() for t in state.values())
        self.weight_count = sum(t.numel() for t in state.values())  # a call's arithmetic is rows x this

    def _attach(self, dotted: str, layers: nn.ModuleDict) -> None:
        """Register `layers` at the full model's path ("transformer.h" -> self.transformer.h)."""
        parent: nn.Module = self
        *path, last = dotted.split(".")
        for name in path:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(last, layers)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """The blocks over `hidden`. With `cache` (from `new_cache`, holding earlier positions' keys and values
        and given this call's), `hidden` and `position_ids` are the new positions only and `attention_mask`
        covers earlier and new ones: a generation step costs one position, not the whole prefix."""
        masks = self.family.attention_masks(self.config, hidden, attention_mask, position_ids, cache,
                                            range(self.start, self.end))
        extra = {}
        if self.rotary is not None:
            extra["position_embeddings"] = self.rotary(hidden, position_ids=position_ids)
        if cache is not None:
            extra[self.family.cache_argument] = cache
            extra["use_cache"] = True
        for kind, layer in zip(self.layer_kinds, self.layers):
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids, **extra)
        return hidden

    def new_cache(self) -> Cache:
        """An empty key/value cache for these blocks (sized per layer kind: sliding layers keep their window)."""
        return DynamicCache(config=self.config)


class TrainerHead(nn.Module):
    """Embeddings (tokens, and learned positions where the family has them), final norm and LM head: the
    only parts of the model the trainer holds. A tied head shares the embedding's parameter, as in the model."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device):
        super().__init__()
        config, family = checkpoint.config, checkpoint.family
        names = checkpoint.trainer_tensor_names()
        tensors = checkpoint.load(sorted(set(names.values())), dtype)
        self.embed = nn.Embedding.from_pretrained(tensors[names["embed"]], freeze=True)
        self.positions = None
        if "positions" in names:
            self.positions = nn.Embedding.from_pretrained(tensors[names["positions"]], freeze=True)
        self.norm = family.final_norm(config).to(dtype)
        self.norm.weight.data.copy_(tensors[names["norm"]])
        if "norm_bias" in names:
            self.norm.bias.data.copy_(tensors[names["norm_bias"]])
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if names["head"] == names["embed"]:
            self.head.weight = self.embed.weight
        else:
            self.head.weight.data.copy_(tensors[names["head"]])
        self.tensor_names = names
        self.requires_grad_(False)
        self.to(device)

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, plus learned position embeddings for families that have them (positions
        0..T-1 when none are given, as the model assumes)."""
        hidden = self.embed(input_ids)
        if self.positions is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = hidden + self.positions(position_ids)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """This head's parameters under their checkpoint names (a tied head is stored once, as the embedding)."""
        parts = {"embed": self.embed.weight, "norm": self.norm.weight, "head": self.head.weight}
        if self.positions is not None:
            parts["positions"] = self.positions.weight
        if "norm_bias" in self.tensor_names:
            parts["norm_bias"] = self.norm.bias
        return {self.tensor_names[role]: tensor for role, tensor in parts.items()}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `checkpoint_tensors`: set this head's parameters from tensors under checkpoint names."""
        own = self.checkpoint_tensors()
        if set(tensors) != set(own):
            raise ValueError(f"head tensors {sorted(tensors)} are not this model's {sorted(own)}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[name].to(param.dtype))
