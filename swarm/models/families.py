"""Per-family knowledge: how to build one block range and the trainer's parts of a causal LM.

Every supported family is Llama-shaped in transformers 5 (`model.embed_tokens`, `model.layers.N`,
`model.norm`, `lm_head`; decoder layers take rotary position embeddings from the model); they differ in
their classes and attention masks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from swarm.errors import ModelSourceError


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    module: str  # transformers modeling module
    prefix: str  # class-name prefix inside that module, e.g. "Llama"
    embed_name: str = "model.embed_tokens.weight"
    norm_name: str = "model.norm.weight"
    head_name: str = "lm_head.weight"

    def _class(self, suffix: str):
        return getattr(importlib.import_module(self.module), self.prefix + suffix)

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def decoder_layer(self, config, index: int) -> torch.nn.Module:
        return self._class("DecoderLayer")(config, index)

    def rotary_embedding(self, config) -> torch.nn.Module:
        return self._class("RotaryEmbedding")(config=config)

    def final_norm(self, config) -> torch.nn.Module:
        return self._class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)

    def attention_masks(self, config, hidden, attention_mask, position_ids) -> dict[str, object]:
        """Masks by attention kind ("full_attention", "sliding_attention"), as the family's model builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                      position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.layer_kinds(config, range(config.num_hidden_layers)):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def layer_kinds(self, config, indices) -> list[str]:
        if self.model_type == "mistral":
            kind = "full_attention" if config.sliding_window is None else "sliding_attention"
            return [kind for _ in indices]
        layer_types = getattr(config, "layer_types", None)
        if self.model_type == "qwen2" and layer_types:
            return [layer_types[i] for i in indices]
        return ["full_attention" for _ in indices]


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", "transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ModelFamily("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ModelFamily("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}


def family_of(config) -> ModelFamily:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelSourceError(
            f"unsupported model architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
