"""A Llama-like decoder's parameter arithmetic, and the Llama-2-like shape of a given parameter count."""

from __future__ import annotations

import math
from dataclasses import dataclass

from swarm.estimate.errors import ModelShapeError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_ASPECT_RATIO = 128  # hidden / layers of Llama-2 7B (4096/32) and 13B (5120/40)
LLAMA_HEAD_DIM = 128
LLAMA_VOCAB = 32000
SHAPE_TOLERANCE = 0.05  # a derived shape must have the requested parameter count within 5 %


def llama_intermediate(hidden: int) -> int:
    """Llama's SwiGLU width: 8/3 of hidden rounded up to a multiple of 256 (4096 -> 11008, 5120 -> 13824)."""
    return 256 * math.ceil(8 * hidden / 3 / 256)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder: the parameter arithmetic of swarm.models.presets.Preset, at any size."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = LLAMA_VOCAB

    def __post_init__(self):
        if min(self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab) < 1:
            raise ModelShapeError("every model dimension (--layers, --hidden, --intermediate, --heads, --kv-heads, "
                                  "--vocab) must be at least 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ModelShapeError(f"--heads {self.heads} must divide --hidden {self.hidden}, and --kv-heads "
                                  f"{self.kv_heads} must divide --heads")

    @classmethod
    def from_preset(cls, preset) -> ModelShape:
        return cls(preset.num_hidden_layers, preset.hidden_size, preset.intermediate_size,
                   preset.num_attention_heads, preset.num_key_value_heads, preset.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one block, under peft's module names."""
        d, f, kv = self.hidden, self.intermediate, self.kv_width
        return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    @property
    def block_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    @property
    def block_norm_params(self) -> int:
        return 2 * self.hidden

    @property
    def block_params(self) -> int:
        return self.block_linear_params + self.block_norm_params

    @property
    def num_parameters(self) -> int:
        """Blocks + untied embedding and LM head + final norm (what presets and HF count)."""
        return self.layers * self.block_params + 2 * self.vocab * self.hidden + self.hidden

    def lora_params_per_block(self, rank: int, targets=LORA_TARGETS) -> int:
        """LoRA on a linear (in, out) adds A (rank x in) and B (out x rank)."""
        return sum(rank * (i + o) for name, (i, o) in self.linear_shapes().items() if name in targets)

    def activation_elements_per_token(self, rank: int = 0, targets=()) -> int:
        """Values one block keeps per token for its backward (fused RMSNorm, flash attention, no dropout).

        Two norm inputs (2h), the normed inputs of attention and MLP (2h), q and o (2h), k and v (2 kv),
        gate, up, silu(gate) and their product (4f), and each LoRA A's output (rank per target).
        """
        return 6 * self.hidden + 2 * self.kv_width + 4 * self.intermediate + rank * len(targets)


def llama_shape(params: float, vocab: int = LLAMA_VOCAB, aspect_ratio: int = LLAMA_ASPECT_RATIO) -> ModelShape:
    """A Llama-2-like shape with about `params` parameters.

    hidden/layers = 128 (Llama-2 7B and 13B; GPT-3 175B is 12288/96), heads of 128, MHA, SwiGLU width from
    `llama_intermediate`. A block has ~12 h^2 parameters, so N ~ 12 h^3 / 128 + 2 V h; solve for h, round it to
    a multiple of 128 (down and up), give each the layer count that best matches N, keep the closer one.
    6.74e9 gives exactly Llama-2 7B (32 x 4096) and 1.3016e10 Llama-2 13B (40 x 5120).
    """
    def approx(h: float) -> float:
        return h / aspect_ratio * 12 * h * h + 2 * vocab * h

    low, high = 1.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if approx(middle) < params else (low, middle)
    best = None
    widths = {LLAMA_HEAD_DIM * max(1, math.floor(low / LLAMA_HEAD_DIM)), LLAMA_HEAD_DIM * math.ceil(low / LLAMA_HEAD_DIM)}
    for hidden in sorted(widths):
        heads = hidden // LLAMA_HEAD_DIM
        probe = ModelShape(1, hidden, llama_intermediate(hidden), heads, heads, vocab)
        layers = max(1, round((params - 2 * vocab * hidden - hidden) / probe.block_params))
        shape = ModelShape(layers, hidden, probe.intermediate, heads, heads, vocab)
        error = abs(shape.num_parameters - params) / params
        if best is None or error < best[0]:
            best = (error, shape)
    error, shape = best
    if error > SHAPE_TOLERANCE:
        raise ModelShapeError(f"--params {params:.3g}: the nearest Llama-like shape ({shape.layers} x {shape.hidden}) "
                              f"has {shape.num_parameters:.3g} parameters; give --layers and --hidden instead")
    return shape
