"""An estimate as the CLI prints it: a table for people, a dict for `--json`."""

from __future__ import annotations

from dataclasses import asdict

from swarm.estimate.inputs import NodeSpec, Workload
from swarm.estimate.layout import Estimate
from swarm.estimate.shape import ModelShape
from swarm.estimate.units import GIB


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
