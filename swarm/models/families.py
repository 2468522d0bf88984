"""Per-family knowledge: how to build one block range and the trainer's parts of a causal LM.

A family names where its tensors live (block prefix, embeddings, final norm, head), which transformers
classes build a decoder layer and rotary embedding, how positions reach the blocks (rotary from the model,
or learned absolute embeddings the trainer adds to the token embeddings), which attention masks each layer
takes, and which modules LoRA targets by default. Everything else (`BlockStack`, `TrainerHead`,
`Checkpoint`) is written once against this interface.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.config import DEFAULT_LORA_TARGETS
from swarm.errors import ModelSourceError


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's "model_type"
    module: str  # transformers modeling module
    model_class: str  # the causal-LM class in that module (presets and tests build the whole model with it)
    layer_class: str  # one decoder layer, built as layer_class(config, index)
    layers_prefix: str  # "model.layers": block i's tensors are "model.layers.{i}.*"
    embed_name: str
    norm_prefix: str  # final norm module; its tensors are "{norm_prefix}.weight" (and ".bias" for LayerNorm)
    head_name: str
    norm_kind: str = "rms"  # "rms": the family's RMSNorm class; "layer": torch LayerNorm with bias
    rotary_class: str | None = None  # None: the family has no rotary embedding
    position_embed_name: str | None = None  # learned absolute positions, held and added by the trainer
    lora_targets: tuple[str, ...] = tuple(DEFAULT_LORA_TARGETS)
    lora_fan_in_fan_out: bool = False  # True where targets are transformers' Conv1D (weight stored in x out)
    # Tensors some checkpoints store inside a block that the layer no longer has (old attention-mask buffers,
    # cached rotary frequencies); named relative to the block prefix and skipped on load.
    stale_block_tensors: tuple[str, ...] = ()
    cache_argument: str = "cache"  # the decoder layer's keyword for the key/value cache (GPT-NeoX: layer_past)

    def _class(self, name: str):
        return getattr(importlib.import_module(self.module), name)

    @property
    def base_prefix(self) -> str:
        """The base model's attribute in the causal-LM class ("model.", "transformer.", "gpt_neox.")."""
        return self.layers_prefix.split(".")[0] + "."

    def block_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def is_block_tensor(self, name: str, index: int) -> bool:
        return name.startswith(self.block_prefix(index)) and not self.is_stale_tensor(name)

    def is_stale_tensor(self, name: str) -> bool:
        head, _, rest = name.removeprefix(self.layers_prefix + ".").partition(".")
        return name.startswith(self.layers_prefix + ".") and head.isdigit() and rest in self.stale_block_tensors

    def decoder_layer(self, config, index: int) -> torch.nn.Module:
        return self._class(self.layer_class)(config, index)

    def causal_lm(self, config) -> torch.nn.Module:
        return self._class(self.model_class)(config)

    def rotary_embedding(self, config) -> torch.nn.Module | None:
        return None if self.rotary_class is None else self._class(self.rotary_class)(config=config)

    def final_norm(self, config) -> torch.nn.Module:
        if self.norm_kind == "layer":
            eps = getattr(config, "layer_norm_epsilon", None) or config.layer_norm_eps
            return torch.nn.LayerNorm(config.hidden_size, eps=eps)
        return self._class(self.layer_class.removesuffix("DecoderLayer") + "RMSNorm")(
            config.hidden_size, eps=config.rms_norm_eps)

    def norm_tensor_names(self) -> dict[str, str]:
        """Final-norm parameter name ("weight", "bias") -> checkpoint tensor name."""
        parts = ("weight", "bias") if self.norm_kind == "layer" else ("weight",)
        return {part: f"{self.norm_prefix}.{part}" for part in parts}

    def lora_target_modules(self, requested: list[str]) -> list[str]:
        """The job's targets; the schema's default (Llama's projection names) means this family's default."""
        return list(self.lora_targets) if list(requested) == DEFAULT_LORA_TARGETS else list(requested)

    def attention_masks(self, config, hidden, attention_mask, position_ids, cache=None,
                        layers: range | None = None) -> dict[str, object]:
        """Masks by attention kind ("full_attention", "sliding_attention"), as the family's model builds them.

        With a key/value `cache` of the blocks `layers`, `hidden` holds only the new positions and
        `attention_mask` covers the cached ones too; each kind's mask is sized by the cache of its first layer
        among `layers` (a node's cache holds no others)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        layers = layers if layers is not None else range(config.num_hidden_layers)
        kinds = self.layer_kinds(config, layers)
        masks = {}
        for kind, build in (("full_attention", create_causal_mask),
                            ("sliding_attention", create_sliding_window_causal_mask)):
            if kind in kinds:
                first = layers[kinds.index(kind)] if cache is not None else None
                masks[kind] = build(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                                    position_ids=position_ids, layer_idx=first)
        return masks

    def layer_kinds(self, config, indices) -> list[str]:
        if self.model_type == "mistral":
            kind = "full_attention" if config.sliding_window is None else "sliding_attention"
            return [kind for _ in indices]
        layer_types = getattr(config, "layer_types", None)
        if self.model_type == "qwen2" and layer_types:
            return [layer_types[i] for i in indices]
        return ["full_attention" for _ in indices]


def _llama_shaped(model_type: str, prefix: str) -> ModelFamily:
    return ModelFamily(
        model_type, f"transformers.models.{model_type}.modeling_{model_type}", f"{prefix}ForCausalLM",
        f"{prefix}DecoderLayer", "model.layers", "model.embed_tokens.weight", "model.norm", "lm_head.weight",
        rotary_class=f"{prefix}RotaryEmbedding",
    )


FAMILIES: dict[str, ModelFamily] = {
    "llama": _llama_shaped("llama", "Llama"),
    "mistral": _llama_shaped("mistral", "Mistral"),
    "qwen2": _llama_shaped("qwen2", "Qwen2"),
    "gpt2": ModelFamily(
        "gpt2", "transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel", "GPT2Block", "transformer.h",
        "transformer.wte.weight", "transformer.ln_f", "lm_head.weight", norm_kind="layer",
        position_embed_name="transformer.wpe.weight", lora_targets=("c_attn", "c_proj", "c_fc"),
        lora_fan_in_fan_out=True, stale_block_tensors=("attn.bias", "attn.masked_bias"),
    ),
    "gpt_neox": ModelFamily(
        "gpt_neox", "transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXLayer",
        "gpt_neox.layers", "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", "embed_out.weight",
        norm_kind="layer", rotary_class="GPTNeoXRotaryEmbedding",
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        stale_block_tensors=("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"),
        cache_argument="layer_past",
    ),
}


def family_of(config) -> ModelFamily:
    return family_named(getattr(config, "model_type", None))


def family_named(model_type: str | None) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ModelSourceError(
            f"unsupported model architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def family_of_directory(path: str | Path) -> ModelFamily:
    """The family of a checkpoint directory, from config.json alone (no transformers config class)."""
    config_file = Path(path) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{config_file}: cannot read it: {error}") from None
    return family_named(model_type)
