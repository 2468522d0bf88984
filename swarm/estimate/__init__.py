"""What a run would take: memory per node, nodes, traffic, time and GPU-hours, for full fine-tuning and LoRA.

The question the project started from: what does it take to fine-tune a 10^9-10^11-parameter model, and how
far does pooling volunteers cut each one's share? Every figure here is a closed-form function of a Llama-like
model shape, the workload and the nodes, so it can be checked by hand; docs/ESTIMATES.md writes each formula
down with its assumptions. Pure Python on purpose (no torch): `swarm-coordinator estimate` answers instantly.

Topology modelled: the trainer (embeddings, final norm, LM head, loss) feeds a chain of `depth` stages of
volunteer nodes, stage to stage; `replicas` such chains train in data parallel and average their trainable
tensors once per optimizer step; micro-batches are pipelined (GPipe), one in flight per stage.

Modules, in the order a figure is built: `units` (flag strings to numbers), `shape` (the model), `inputs`
(workload and node), `costs` (per block: memory, FLOPs, bytes), `layout` (the whole run at its best layout),
`report` (table and JSON), `flags` (the CLI's flags to inputs), `errors`. The names below are the API.
"""

from swarm.estimate.costs import (
    SIDEBAND_BYTES_PER_TOKEN, FlopsPerToken, NodeMemory, averaging_bytes, blocks_per_node, boundary_bytes,
    flops_per_token, link_bytes_per_micro_batch, node_memory, weight_bytes,
)  # fmt: skip
from swarm.estimate.errors import EstimateInputError, ModelShapeError, SizeFormatError
from swarm.estimate.flags import FLAG_DEFAULTS, inputs_from_flags
from swarm.estimate.inputs import NodeSpec, Workload
from swarm.estimate.layout import BITS, LAYOUT_SLACK, METHODS, Estimate, estimate, estimate_all
from swarm.estimate.report import format_report, report_dict
from swarm.estimate.shape import (
    LLAMA_ASPECT_RATIO, LLAMA_HEAD_DIM, LLAMA_VOCAB, LORA_TARGETS, SHAPE_TOLERANCE, ModelShape, llama_intermediate,
    llama_shape,
)  # fmt: skip
from swarm.estimate.units import (
    GIB, parse_bandwidth, parse_bytes, parse_count, parse_fraction, parse_int, parse_number,
)  # fmt: skip

__all__ = [
    "BITS", "FLAG_DEFAULTS", "GIB", "LAYOUT_SLACK", "LLAMA_ASPECT_RATIO", "LLAMA_HEAD_DIM", "LLAMA_VOCAB",
    "LORA_TARGETS", "METHODS", "SHAPE_TOLERANCE", "SIDEBAND_BYTES_PER_TOKEN",
    "Estimate", "EstimateInputError", "FlopsPerToken", "ModelShape", "ModelShapeError", "NodeMemory", "NodeSpec",
    "SizeFormatError", "Workload",
    "averaging_bytes", "blocks_per_node", "boundary_bytes", "estimate", "estimate_all", "flops_per_token",
    "format_report", "inputs_from_flags", "link_bytes_per_micro_batch", "llama_intermediate", "llama_shape",
    "node_memory", "parse_bandwidth", "parse_bytes", "parse_count", "parse_fraction", "parse_int", "parse_number",
    "report_dict", "weight_bytes",
]
