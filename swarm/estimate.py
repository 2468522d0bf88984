"""What a run would take: memory per node, nodes, traffic, time and GPU-hours, for full fine-tuning and LoRA.

The question the project started from: what does it take to fine-tune a 10^9-10^11-parameter model, and how
far does pooling volunteers cut each one's share? Every figure here is a closed-form function of a Llama-like
model shape, the workload and the nodes, so it can be checked by hand; docs/ESTIMATES.md writes each formula
down with its assumptions. Pure Python on purpose (no torch): `swarm-coordinator estimate` answers instantly.

Topology modelled: the trainer (embeddings, final norm, LM head, loss) feeds a chain of `depth` stages of
volunteer nodes, stage to stage; `replicas` such chains train in data parallel and average their trainable
tensors once per optimizer step; micro-batches are pipelined (GPipe), one in flight per stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from swarm.errors import SwarmError

GIB = 1 << 30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = (16, 8, 4)
METHODS = ("full", "lora")
LLAMA_ASPECT_RATIO = 128  # hidden / layers of Llama-2 7B (4096/32) and 13B (5120/40)
LLAMA_HEAD_DIM = 128
LLAMA_VOCAB = 32000
SIDEBAND_BYTES_PER_TOKEN = 16  # attention mask + position ids, int64 each, sent with every forward call
SHAPE_TOLERANCE = 0.05  # a derived shape must have the requested parameter count within 5 %


class EstimateInputError(SwarmError):
    """A flag of `swarm-coordinator estimate` is malformed or out of range."""


class SizeFormatError(EstimateInputError):
    """A count, size or bandwidth could not be parsed."""


class ModelShapeError(EstimateInputError):
    """The model shape is inconsistent, or no Llama-like shape has the requested parameter count."""


# ---------------------------------------------------------------------------------------------- parsing

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_COUNT_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_BYTE_UNITS = {"": 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
               "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_BIT_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_BYTE_RATE_UNITS = {"B/s": 1, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "MiB/s": 1 << 20, "GiB/s": 1 << 30}


def parse_number(text: str, flag: str, minimum: float = 0.0, exclusive: bool = True) -> float:
    """`1e10`, `13B`, `810M`, `20k`, `0.4` -> a number (suffixes are decimal: k, M, B = 10^9, T)."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([kKmMbBtT]?)\s*", str(text))
    if not match:
        raise SizeFormatError(f"{flag} {text!r}: expected a number such as 1e10, 13B, 810M or 512")
    value = float(match.group(1)) * _COUNT_SUFFIX[match.group(2).lower()]
    if value < minimum or (exclusive and value == minimum):
        raise EstimateInputError(f"{flag} {text!r}: must be {'more than' if exclusive else 'at least'} {minimum:g}")
    return value


def parse_count(text: str, flag: str) -> float:
    return parse_number(text, flag)


def parse_int(text: str, flag: str, minimum: int = 1) -> int:
    value = parse_number(text, flag, minimum, exclusive=False)
    if value != int(value):
        raise EstimateInputError(f"{flag} {text!r}: expected a whole number of at least {minimum}")
    return int(value)


def parse_bytes(text: str, flag: str) -> int:
    """`24GiB`, `512MiB`, `80GB`, `1e10` (bytes) -> bytes. Binary units are powers of 1024, others of 1000."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2) not in _BYTE_UNITS or float(match.group(1)) <= 0:
        raise SizeFormatError(f"{flag} {text!r}: expected a size such as 24GiB, 512MiB, 80GB or 1e10 (bytes); "
                              f"units: {', '.join(unit for unit in _BYTE_UNITS if unit)}")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


def parse_bandwidth(text: str, flag: str) -> float:
    """`100Mbit`, `1Gbit`, `20Mbps`, `1Gbit/s`, `12.5MB/s` -> bytes per second (one direction of a link)."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z/]+)\s*", str(text))
    unit = match.group(2) if match else ""
    if match and unit.lower().removesuffix("/s") in _BIT_UNITS and float(match.group(1)) > 0:
        return float(match.group(1)) * _BIT_UNITS[unit.lower().removesuffix("/s")] / 8
    if match and unit in _BYTE_RATE_UNITS and float(match.group(1)) > 0:
        return float(match.group(1)) * _BYTE_RATE_UNITS[unit]
    raise SizeFormatError(f"{flag} {text!r}: expected a bandwidth such as 100Mbit, 1Gbit, 20Mbps or 12.5MB/s")


def parse_fraction(text: str, flag: str) -> float:
    value = parse_count(text, flag)
    if value > 1:
        raise EstimateInputError(f"{flag} {text!r}: expected a fraction in (0, 1], e.g. 0.4")
    return value


# ---------------------------------------------------------------------------------------------- model shape


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


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Workload:
    """What is trained: LoRA settings, sequence shapes, token budget, and what crosses the wire."""

    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seq: int = 512
    tokens: float = 2e7
    micro_batch: int = 1  # sequences per micro-batch
    batch: int = 32  # sequences per optimizer step, a multiple of micro_batch
    recompute: bool = False  # activation checkpointing per block
    activation_bytes: int = 2  # bf16 activations kept for backward
    wire_bytes: int = 2  # activations, activation grads and averaged tensors sent as 16-bit

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch * self.seq


@dataclass(frozen=True)
class NodeSpec:
    """One volunteer: device memory, peak throughput times the achieved fraction (MFU), and its link."""

    memory_bytes: int = 24 * GIB
    tflops: float = 70.0
    efficiency: float = 0.4
    link_bytes_per_s: float = 100e6 / 8
    latency_s: float = 0.05
    volunteers: int = 16
    reserved_bytes: int = GIB  # CUDA context, allocator slack, temporary buffers

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12 * self.efficiency


# ---------------------------------------------------------------------------------------------- per block


@dataclass(frozen=True)
class NodeMemory:
    weights: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations


def weight_bytes(params: int, bits: int) -> float:
    return params * bits / 8


def node_memory(shape: ModelShape, work: Workload, method: str, bits: int, blocks: int) -> NodeMemory:
    """Memory of a node holding `blocks` blocks for one micro-batch in flight.

    Linear weights at `bits` (quantization constants left out, ~3 % for NF4 with double quantization), norms
    at 16 bits. LoRA: fp32 adapters, fp32 grads, AdamW's two fp32 moments. Full: 16-bit grads of every
    weight, fp32 master copy and two fp32 moments (the 16 bytes/parameter of mixed-precision AdamW at 16 bits).
    Activations: see ModelShape.activation_elements_per_token; with recomputation a block keeps only its input
    (hidden values per token) and one block at a time holds its full set during backward.
    """
    weights = blocks * (weight_bytes(shape.block_linear_params, bits) + weight_bytes(shape.block_norm_params, 16))
    if method == "lora":
        lora = blocks * shape.lora_params_per_block(work.lora_rank, work.lora_targets)
        adapters, gradients, optimizer = 4 * lora, 4 * lora, 8 * lora
    else:
        adapters, gradients, optimizer = 0, 2 * blocks * shape.block_params, 12 * blocks * shape.block_params
    rank, targets = (work.lora_rank, work.lora_targets) if method == "lora" else (0, ())
    full_block = shape.activation_elements_per_token(rank, targets) * work.micro_tokens * work.activation_bytes
    if work.recompute:
        activations = blocks * shape.hidden * work.micro_tokens * work.activation_bytes + full_block
    else:
        activations = blocks * full_block
    return NodeMemory(weights, adapters, gradients, optimizer, activations)


def blocks_per_node(shape: ModelShape, work: Workload, node: NodeSpec, method: str, bits: int) -> int:
    """Most blocks whose memory fits in the node after its reserve (memory is affine in the block count)."""
    usable = node.memory_bytes - node.reserved_bytes
    one, two = (node_memory(shape, work, method, bits, n).total for n in (1, 2))
    per_block, fixed = two - one, 2 * one - two
    return max(0, min(shape.layers, math.floor((usable - fixed) / per_block)))


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token: one block (linears + attention scores) and the trainer's LM head."""

    block: float
    head: float

    def total(self, layers: int) -> float:
        return layers * self.block + self.head


def flops_per_token(shape: ModelShape, work: Workload, method: str) -> FlopsPerToken:
    """A linear of n weights costs 2n FLOPs per token forward, 2n for the input grad, 2n for the weight grad.

    Full: 6 N. LoRA: the frozen base needs forward and input grads only, 4 N, plus 6 per adapter parameter.
    Attention scores and their use (QK^T, AV) add 4 s h forward per token and block, twice that backward
    (PaLM's 12 L s h accounting; no weights, so the same for both methods). The head on the trainer: 2 V h
    forward, 2 V h for the hidden-state grad, and 2 V h weight grad in full fine-tuning only. Recomputation
    repeats each block's forward. Embedding lookups, norms and element-wise ops are left out (<1 %).
    """
    attention = 4 * work.seq * shape.hidden
    if method == "full":
        forward = 2 * shape.block_linear_params + attention
        block, head = 6 * shape.block_linear_params + 3 * attention, 6 * shape.vocab * shape.hidden
    else:
        lora = shape.lora_params_per_block(work.lora_rank, work.lora_targets)
        forward = 2 * shape.block_linear_params + 2 * lora + attention
        block, head = 4 * shape.block_linear_params + 6 * lora + 3 * attention, 4 * shape.vocab * shape.hidden
    return FlopsPerToken(block + (forward if work.recompute else 0), head)


def boundary_bytes(tokens: int, hidden: int, wire_bytes: int) -> int:
    """Hidden states (or their grads) of `tokens` tokens crossing one stage boundary in one direction."""
    return tokens * hidden * wire_bytes


def link_bytes_per_micro_batch(shape: ModelShape, work: Workload) -> int:
    """What one node sends per micro-batch: its output hidden states forward (with mask and positions) and
    the grad of its input backward. No weight gradients cross stage links, for LoRA or full fine-tuning."""
    activations = boundary_bytes(work.micro_tokens, shape.hidden, work.wire_bytes)
    return 2 * activations + SIDEBAND_BYTES_PER_TOKEN * work.micro_tokens


def averaging_bytes(tensor_bytes: float, replicas: int) -> float:
    """Bytes one replica sends to sum `tensor_bytes` with the others (node.replica_reduce, as hivemind's):
    reduce-scatter and all-gather each send (R-1)/R of the tensor."""
    return 2 * (replicas - 1) / replicas * tensor_bytes if replicas > 1 else 0.0


# ---------------------------------------------------------------------------------------------- whole run


@dataclass(frozen=True)
class Estimate:
    """One row: a method at a bit width. Layout, time and share fields are None when one block cannot fit."""

    method: str
    bits: int
    blocks_per_node: int
    min_nodes: int | None
    memory: NodeMemory  # a node as placed (one block when nothing fits)
    flops_per_token: float
    pipeline_depth: int | None = None
    stage_blocks: int | None = None  # blocks one node holds as placed
    replicas: int | None = None
    nodes_used: int | None = None
    short_of_volunteers: bool = False
    micro_batches_per_step: int | None = None
    bytes_per_step_per_link: float | None = None
    seconds_per_step: float | None = None
    seconds_per_step_sequential: float | None = None
    steps: int | None = None
    wall_hours: float | None = None
    gpu_hours_ideal: float | None = None
    gpu_hours_held: float | None = None
    participant: dict = field(default_factory=dict)
    coordinator: dict = field(default_factory=dict)


LAYOUT_SLACK = 1.05  # a layout with fewer nodes within 5 % of the fastest wins: don't hold GPUs for a marginal gain


def estimate(shape: ModelShape, work: Workload, node: NodeSpec, method: str, bits: int) -> Estimate:
    """The run at its best layout of the volunteers into `depth` stages x `replicas` chains.

    Candidates: every replica count the volunteers allow that divides the batch's micro-batches, each at the
    shallowest depth that fits and at the deepest the volunteers allow. The fastest wins, except that a layout
    with fewer nodes within LAYOUT_SLACK of it wins. With fewer volunteers than `min_nodes`, the figures are
    for `min_nodes` nodes and the row says so.
    """
    fit = blocks_per_node(shape, work, node, method, bits)
    flops = flops_per_token(shape, work, method)
    ideal_h = flops.total(shape.layers) * work.tokens / node.flops_per_s / 3600
    if fit == 0:
        return Estimate(method, bits, 0, None, node_memory(shape, work, method, bits, 1), flops.total(shape.layers),
                        gpu_hours_ideal=ideal_h)
    min_nodes = math.ceil(shape.layers / fit)
    if node.volunteers < min_nodes:
        layouts = {(min_nodes, 1)}
    else:
        chains = work.batch // work.micro_batch  # replicas divide the batch, so every layout trains the same batch
        layouts = {(depth, replicas) for replicas in range(1, min(chains, node.volunteers // min_nodes) + 1)
                   if chains % replicas == 0 for depth in (min_nodes, min(shape.layers, node.volunteers // replicas))}
    rows = [_placed(shape, work, node, method, bits, flops, fit, min_nodes, depth, replicas, ideal_h)
            for depth, replicas in layouts]
    fastest = min(row.wall_hours for row in rows)
    return min((row for row in rows if row.wall_hours <= LAYOUT_SLACK * fastest),
               key=lambda row: (row.nodes_used, row.wall_hours))


def _placed(shape: ModelShape, work: Workload, node: NodeSpec, method: str, bits: int, flops: FlopsPerToken,
            fit: int, min_nodes: int, depth: int, replicas: int, ideal_h: float) -> Estimate:
    """Time, traffic and shares of one layout (formulas in docs/ESTIMATES.md)."""
    stage_blocks = math.ceil(shape.layers / depth)
    depth = math.ceil(shape.layers / stage_blocks)  # no idle stage when blocks do not divide evenly
    compute_s = stage_blocks * flops.block * work.micro_tokens / node.flops_per_s
    micro_link = link_bytes_per_micro_batch(shape, work)
    link_s = micro_link / node.link_bytes_per_s + 2 * node.latency_s
    slot_s = max(compute_s, link_s)
    lora = shape.lora_params_per_block(work.lora_rank, work.lora_targets)
    trainable = lora if method == "lora" else shape.block_params
    averaged = averaging_bytes(stage_blocks * trainable * work.wire_bytes, replicas)
    average_s = averaged / node.link_bytes_per_s + 2 * node.latency_s if replicas > 1 else 0.0
    micro_batches = work.batch // (work.micro_batch * replicas)
    step_s = (micro_batches + depth - 1) * slot_s + average_s
    steps = math.ceil(work.tokens / (micro_batches * replicas * work.micro_tokens))
    step_bytes = micro_batches * micro_link + averaged
    wall_h, nodes = steps * step_s / 3600, depth * replicas
    memory = node_memory(shape, work, method, bits, stage_blocks)

    head_params = 2 * shape.vocab * shape.hidden + shape.hidden
    coordinator_bytes = replicas * micro_batches * micro_link
    coordinator = {
        # 16-bit embeddings, norm and head (+ grads, fp32 master and moments in full fine-tuning) + fp32 logits
        "memory_bytes": 2 * head_params + (14 * head_params if method == "full" else 0)
        + 2 * work.micro_tokens * shape.vocab * 4,
        "bytes_per_step": coordinator_bytes,
        "link_bytes_per_s_needed": coordinator_bytes / step_s,
        "tflops_needed": flops.head * micro_batches * replicas * work.micro_tokens / step_s / node.efficiency / 1e12,
    }
    participant = {
        "gpu_hours_held": wall_h,
        "gpu_hours_compute": shape.layers * flops.block * work.tokens / node.flops_per_s / 3600 / nodes,
        "bytes_sent": steps * step_bytes,
        "memory_bytes": memory.total + node.reserved_bytes,
    }
    return Estimate(method, bits, fit, min_nodes, memory, flops.total(shape.layers), pipeline_depth=depth,
                    stage_blocks=stage_blocks, replicas=replicas, nodes_used=nodes,
                    short_of_volunteers=node.volunteers < min_nodes, micro_batches_per_step=micro_batches,
                    bytes_per_step_per_link=step_bytes, seconds_per_step=step_s,
                    seconds_per_step_sequential=micro_batches * depth * (compute_s + link_s) + average_s,
                    steps=steps, wall_hours=wall_h, gpu_hours_ideal=ideal_h, gpu_hours_held=wall_h * nodes,
                    participant=participant, coordinator=coordinator)


def estimate_all(shape: ModelShape, work: Workload, node: NodeSpec) -> list[Estimate]:
    return [estimate(shape, work, node, method, bits) for method in METHODS for bits in BITS]


# ---------------------------------------------------------------------------------------------- reports


def report_dict(shape: ModelShape, work: Workload, node: NodeSpec, rows: list[Estimate]) -> dict:
    model = {**asdict(shape), "num_parameters": shape.num_parameters}
    estimates = [{**asdict(row), "memory": {**asdict(row.memory), "total": row.memory.total}} for row in rows]
    return {"model": model, "workload": asdict(work), "node": asdict(node), "estimates": estimates}


def _gib(count: float) -> str:
    return f"{count / GIB:.2f}"


def _fmt(value: float | None) -> str:
    """Three significant figures, thousands grouped: 0.0123, 4.56, 78.9, 1,234."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])

    return [line(row) for row in [header, *lines]]


def format_report(shape: ModelShape, work: Workload, node: NodeSpec, rows: list[Estimate]) -> str:
    name = {"full": "full", "lora": f"LoRA r={work.lora_rank}"}
    out = [
        f"model: {shape.num_parameters:.3g} parameters, {shape.layers} layers x hidden {shape.hidden}, intermediate "
        f"{shape.intermediate}, {shape.heads} heads ({shape.kv_heads} kv), vocab {shape.vocab}",
        f"work: {work.tokens:.3g} tokens, sequences of {work.seq}, batch {work.batch}, micro-batch {work.micro_batch}, "
        f"LoRA on {','.join(work.lora_targets)}{', recomputation' if work.recompute else ''}",
        f"nodes: {node.volunteers} volunteers, {_gib(node.memory_bytes)} GiB ({_gib(node.reserved_bytes)} reserved), "
        f"{node.tflops:g} TFLOPS x {node.efficiency:g} efficiency, {node.link_bytes_per_s * 8 / 1e6:g} Mbit/s, "
        f"{node.latency_s * 1e3:g} ms",
        "", "memory per node, GiB (blocks held by one node as placed)",
    ]
    out += _table(["method", "bits", "blocks", "weights", "adapters", "grads", "optimizer", "activations", "total"], [
        [name[r.method], str(r.bits), str(r.stage_blocks or 1),
         *(_gib(v) for v in (r.memory.weights, r.memory.adapters, r.memory.gradients, r.memory.optimizer,
                             r.memory.activations, r.memory.total))] for r in rows])
    out += ["", "nodes, traffic and time"]
    out += _table(["method", "bits", "min nodes", "stages x replicas", "MB/step/link", "s/step", "GPU-h ideal",
                   "GPU-h held", "GPU-h/participant", "GB/participant"], [
        [name[r.method], str(r.bits), _fmt(r.min_nodes),
         "—" if r.min_nodes is None else f"{r.pipeline_depth} x {r.replicas}{' *' if r.short_of_volunteers else ''}",
         _fmt(None if r.min_nodes is None else r.bytes_per_step_per_link / 1e6), _fmt(r.seconds_per_step),
         _fmt(r.gpu_hours_ideal), _fmt(r.gpu_hours_held),
         _fmt(r.participant.get("gpu_hours_held")),
         _fmt(None if r.min_nodes is None else r.participant["bytes_sent"] / 1e9)] for r in rows])
    notes = []
    if any(r.min_nodes is None for r in rows):
        notes.append("— one block does not fit in a node (needs tensor parallelism or a bigger device)")
    if any(r.short_of_volunteers for r in rows):
        notes.append(f"* needs more than the {node.volunteers} volunteers: figures are for the minimum number of nodes")
    notes.append("GPU-h ideal = FLOPs / (TFLOPS x efficiency); held = wall-clock x nodes (incl. waiting on links)")
    return "\n".join(out + [""] + notes)


FLAG_DEFAULTS = {
    "lora_rank": "8", "lora_targets": ",".join(LORA_TARGETS), "seq": "512", "tokens": "2e7", "micro_batch": "1",
    "batch": "32", "node_mem": "24GiB", "reserve": "1GiB", "node_tflops": "70", "efficiency": "0.4",
    "link": "100Mbit", "latency_ms": "50", "volunteers": "16",
}


def inputs_from_flags(flags: dict) -> tuple[ModelShape, Workload, NodeSpec]:
    """Command-line strings (keyed by argparse dest; None = not given) -> typed inputs; errors name the flag."""
    f = {**FLAG_DEFAULTS, **{key: value for key, value in flags.items() if value is not None}}
    if sum(f.get(key) is not None for key in ("params", "preset", "layers")) != 1:
        raise ModelShapeError("give exactly one of --params, --preset, or --layers with --hidden")
    vocab = parse_int(f.get("vocab") or LLAMA_VOCAB, "--vocab")
    if f.get("preset") is not None:
        from swarm.models.presets import PRESETS  # imports torch: only when asked for

        llama = sorted(name for name, preset in PRESETS.items() if preset.family == "llama")
        if f["preset"] not in llama:  # the estimator's arithmetic is a Llama decoder's
            raise ModelShapeError(f"--preset {f['preset']!r}: choose one of {', '.join(llama)}")
        shape = ModelShape.from_preset(PRESETS[f["preset"]])
    elif f.get("params") is not None:
        shape = llama_shape(parse_count(f["params"], "--params"), vocab)
    else:
        if f.get("hidden") is None:
            raise ModelShapeError("--layers needs --hidden (and optionally --intermediate, --heads, --kv-heads)")
        hidden = parse_int(f["hidden"], "--hidden")
        heads = parse_int(f["heads"], "--heads") if f.get("heads") else max(1, hidden // LLAMA_HEAD_DIM)
        shape = ModelShape(parse_int(f["layers"], "--layers"), hidden,
                           parse_int(f["intermediate"], "--intermediate") if f.get("intermediate")
                           else llama_intermediate(hidden),
                           heads, parse_int(f["kv_heads"], "--kv-heads") if f.get("kv_heads") else heads, vocab)
    targets = tuple(target.strip() for target in f["lora_targets"].split(",") if target.strip())
    if not targets or any(target not in LORA_TARGETS for target in targets):
        raise EstimateInputError(f"--lora-targets {f['lora_targets']!r}: a comma-separated subset of "
                                 f"{','.join(LORA_TARGETS)}")
    work = Workload(parse_int(f["lora_rank"], "--lora-rank"), targets, parse_int(f["seq"], "--seq"),
                    parse_count(f["tokens"], "--tokens"), parse_int(f["micro_batch"], "--micro-batch"),
                    parse_int(f["batch"], "--batch"), bool(f.get("recompute")))
    if work.batch % work.micro_batch:
        raise EstimateInputError(f"--batch {work.batch} must be a multiple of --micro-batch {work.micro_batch}")
    node = NodeSpec(parse_bytes(f["node_mem"], "--node-mem"), parse_count(f["node_tflops"], "--node-tflops"),
                    parse_fraction(f["efficiency"], "--efficiency"), parse_bandwidth(f["link"], "--link"),
                    parse_number(f["latency_ms"], "--latency-ms", exclusive=False) / 1e3,
                    parse_int(f["volunteers"], "--volunteers"), parse_bytes(f["reserve"], "--reserve"))
    if node.reserved_bytes >= node.memory_bytes:
        raise EstimateInputError(f"--reserve {f['reserve']} leaves nothing of --node-mem {f['node_mem']}")
    return shape, work, node
