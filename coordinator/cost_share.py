"""Who paid for a run: per node compute seconds, FLOPs, tokens, bytes and peak memory, and its share.

The cost-sharing question (many small actors each paying a small part of a fine-tuning run) needs each
participant's part measured, not assumed. Everything here is read from the run directory alone, so a finished
run can be re-reported:

- tokens, compute seconds and shares: `swarm.audit.query.who` over the signed attestations in audit.db, so the
  table says exactly what `swarm-audit who` says;
- bytes: the bytes sent and received that each attestation declares (training calls of the step);
- FLOPs: tokens x blocks x the per-block training FLOPs of `swarm.estimate.flops_per_token` for the model's
  shape (full fine-tuning formulas in `pretrain` phases, LoRA otherwise);
- peak memory: what each node last reported over the control plane (nodes.json);
- one machine: the single-process baseline timed at the end of the run (baseline.json, `coordinator.baseline`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


from coordinator.run_dir import read_metrics
from swarm.audit.query import who
from swarm.config import Job, load_job
from swarm.estimate import ModelShape, Workload, flops_per_token

BASELINE_FILE = "baseline.json"


@dataclass
class NodeCost:
    node_id: str
    blocks: list[tuple[int, int]]
    device: str = ""
    steps: int = 0
    tokens: int = 0
    compute_seconds: float = 0.0
    compute_share: float = 0.0  # of the nodes' attested compute seconds, as `swarm-audit who`
    flops: float | None = None
    flops_share: float | None = None  # of the nodes' estimated FLOPs
    bytes_sent: int = 0
    bytes_received: int = 0
    peak_rss_bytes: int | None = None
    peak_device_bytes: int | None = None


@dataclass
class OneMachine:
    """The same run on one machine: measured seconds per token, scaled to the run's tokens and phase kinds."""

    seconds: float | None = None
    flops: float | None = None
    peak_rss_bytes: int | None = None
    how: str = ""


@dataclass
class CostShare:
    nodes: list[NodeCost] = field(default_factory=list)
    trainer_flops: float | None = None  # the coordinator's embeddings, LM head and loss
    wall_seconds: float = 0.0  # training steps' wall-clock time, from metrics.jsonl
    one_machine: OneMachine = field(default_factory=OneMachine)

    @property
    def compute_seconds(self) -> float:
        return sum(node.compute_seconds for node in self.nodes)

    @property
    def node_flops(self) -> float | None:
        return None if any(node.flops is None for node in self.nodes) else sum(node.flops for node in self.nodes)


LLAMA_LIKE = ("llama", "mistral", "qwen2")  # the families swarm.estimate's block formulas describe


def model_shape(job: Job) -> ModelShape | None:
    """The model's shape from its preset or its config.json; None when the checkpoint is not on this machine
    or the family's blocks are not Llama-like (the FLOPs formulas would not hold)."""
    if job.model.preset is not None:
        from swarm.models.presets import PRESETS

        preset = PRESETS[job.model.preset]
        return ModelShape.from_preset(preset) if getattr(preset, "family", "llama") in LLAMA_LIKE else None
    config_path = Path(job.model.path) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in LLAMA_LIKE:
        return None
    heads = config["num_attention_heads"]
    return ModelShape(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], heads,
                      config.get("num_key_value_heads") or heads, config["vocab_size"])


def _method(kind: str) -> str:
    return "full" if kind == "pretrain" else "lora"


def _node_flops(audit_path: Path, phases: dict[str, str], shape: ModelShape, work: Workload) -> dict[str, float]:
    """FLOPs per node: per phase, tokens through each block the node held x that block's training FLOPs."""
    flops: dict[str, float] = {}
    for phase, kind in phases.items():
        per_block = flops_per_token(shape, work, _method(kind)).block
        for row in who(audit_path, phase=phase):
            if len(row.blocks) == 1:
                (start, end), = row.blocks
                flops[row.node_id] = flops.get(row.node_id, 0.0) + row.tokens * (end - start) * per_block
                continue
            for block in range(min(s for s, _ in row.blocks), max(e for _, e in row.blocks)):
                for part in who(audit_path, phase=phase, block=block):
                    if part.node_id == row.node_id:
                        flops[row.node_id] = flops.get(row.node_id, 0.0) + part.tokens * per_block
    return flops


def cost_share(run_dir: Path) -> CostShare:
    run_dir = Path(run_dir)
    job = load_job(run_dir / "job.yaml")
    train = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("type", "train") == "train"]
    phases = {row["phase"]: row.get("kind", "sft") for row in train}
    audit_path = run_dir / "audit.db"
    nodes_file = run_dir / "nodes.json"
    reported = {node["node_id"]: node for node in json.loads(nodes_file.read_text())} if nodes_file.exists() else {}
    shape = model_shape(job)
    work = Workload(lora_rank=job.lora.r, lora_targets=tuple(job.lora.target_modules), seq=job.data.max_length)
    flops = _node_flops(audit_path, phases, shape, work) if shape is not None else {}

    share = CostShare(wall_seconds=sum(row["seconds"] for row in train))
    for row in who(audit_path):
        node = reported.get(row.node_id, {})
        share.nodes.append(NodeCost(
            row.node_id, row.blocks, node.get("device", ""), row.steps, row.tokens, row.compute_seconds,
            row.compute_share, flops.get(row.node_id) if shape is not None else None, None, row.bytes_sent,
            row.bytes_received,
            node.get("peak_rss_bytes"), node.get("peak_device_bytes"),
        ))
    total_flops = share.node_flops
    for node in share.nodes:
        if total_flops:
            node.flops_share = node.flops / total_flops
    if shape is not None:
        phase_tokens = {phase: sum(r["tokens"] for r in train if r["phase"] == phase) for phase in phases}
        share.trainer_flops = sum(tokens * flops_per_token(shape, work, _method(phases[phase])).head
                                  for phase, tokens in phase_tokens.items())
        share.one_machine = _one_machine(run_dir, phases, phase_tokens, shape, work)
    return share


def _one_machine(run_dir: Path, phases: dict[str, str], phase_tokens: dict[str, int], shape: ModelShape,
                 work: Workload) -> OneMachine:
    """Seconds one process would spend: the baseline's measured seconds per token times each phase's tokens,
    full-parameter steps' for `pretrain` phases, LoRA steps' for the others. A baseline.json from before
    full steps were timed scales the LoRA figure by the FLOPs ratio of full fine-tuning to LoRA instead."""
    flops = sum(tokens * flops_per_token(shape, work, _method(phases[p])).total(shape.layers)
                for p, tokens in phase_tokens.items())
    path = run_dir / BASELINE_FILE
    if not path.exists():
        return OneMachine(flops=flops, how="no single-process baseline was measured for this run")
    baseline = json.loads(path.read_text())
    if baseline.get("skipped"):
        return OneMachine(flops=flops, how=f"single-process baseline not measured: {baseline['skipped']}")
    per_token = baseline["seconds_per_token"]
    full_per_token = baseline.get("pretrain_seconds_per_token")
    lora = flops_per_token(shape, work, "lora").total(shape.layers)

    def phase_per_token(phase: str) -> float:
        if phases[phase] != "pretrain":
            return per_token
        if full_per_token is not None:
            return full_per_token
        return per_token * flops_per_token(shape, work, "full").total(shape.layers) / lora

    seconds = sum(tokens * phase_per_token(p) for p, tokens in phase_tokens.items())
    how = (f"measured: {baseline['steps_timed']} single-process peft LoRA steps of the same model, batch and "
           f"micro-batches after the run ({baseline['torch_threads']} torch threads on {baseline['device']}), "
           f"{per_token * 1e3:.3f} ms per token (the steps' median), times the run's tokens")
    if any(kind == "pretrain" for kind in phases.values()):
        how += (f"; `pretrain` phases timed the same way with full-parameter steps, {full_per_token * 1e3:.3f} ms "
                "per token" if full_per_token is not None
                else "; `pretrain` phases scaled by the full/LoRA FLOPs ratio (estimated, not timed)")
    return OneMachine(seconds, flops, baseline.get("peak_rss_bytes"), how)


# ---------------------------------------------------------------------------------------------- report


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / (1 << 20):.0f} MiB"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def cost_share_lines(share: CostShare) -> list[str]:
    """The report's cost-share section (markdown)."""
    if not share.nodes:
        return ["## Cost share", "", "No attested steps in audit.db: nothing to share out.", ""]
    gpu = any(node.peak_device_bytes for node in share.nodes)
    header = ("| node | blocks | steps | tokens | compute s | share of compute s | est. FLOPs | share of FLOPs | "
              "bytes sent | bytes received | peak RSS |" + (" peak GPU |" if gpu else ""))
    lines = [
        "## Cost share", "",
        "Per node, from the signed attestations in `audit.db` (the same totals as `swarm-audit who`): tokens, "
        "compute seconds (time the node spent in this run's training calls) and bytes of those calls as the node "
        "declared them. **Share of compute s** is the node's part of all nodes' attested compute seconds (the "
        "`swarm-audit who` share); **share of FLOPs** its part of the nodes' estimated FLOPs (tokens x blocks x "
        "the per-block formulas of docs/ESTIMATES.md). Peak RSS is the node process's high-water mark "
        "(getrusage) it reported at the end of training, including Python, torch and hivemind themselves.", "",
        header, "|" + "---|" * (header.count("|") - 1),
    ]
    for node in share.nodes:
        blocks = ", ".join(f"[{start},{end})" for start, end in node.blocks)
        lines.append(
            f"| `{node.node_id}` | {blocks} | {node.steps} | {node.tokens} | {node.compute_seconds:.2f} | "
            f"{_pct(node.compute_share)} | {_si(node.flops)} | {_pct(node.flops_share)} | "
            f"{_si(node.bytes_sent, 'B')} | {_si(node.bytes_received, 'B')} | {_mib(node.peak_rss_bytes)} |"
            + (f" {_mib(node.peak_device_bytes)} |" if gpu else "")
        )
    node_flops, one = share.node_flops, share.one_machine
    peaks = [node.peak_rss_bytes for node in share.nodes if node.peak_rss_bytes]
    largest, summed = (_mib(max(peaks)), _mib(sum(peaks))) if peaks else ("—", "—")
    lines += [
        f"| **all nodes** | | | | {share.compute_seconds:.2f} | 100% | {_si(node_flops)} | "
        f"{'100%' if node_flops else '—'} | {_si(sum(n.bytes_sent for n in share.nodes), 'B')} | "
        f"{_si(sum(n.bytes_received for n in share.nodes), 'B')} | "
        f"{summed} (sum) |" + (" |" if gpu else ""), "",
        "### Against one machine doing the whole run", "",
        "| | swarm | one machine | swarm / one machine |", "|---|---|---|---|",
        f"| training wall-clock s | {share.wall_seconds:.2f} | {_secs(one.seconds)} | "
        f"{_ratio(share.wall_seconds, one.seconds)} |",
        f"| compute s (nodes, attested) | {share.compute_seconds:.2f} | {_secs(one.seconds)} | "
        f"{_ratio(share.compute_seconds, one.seconds)} |",
        f"| node-seconds held (wall-clock x {len(share.nodes)} nodes) | {share.wall_seconds * len(share.nodes):.2f} | "
        f"{_secs(one.seconds)} | {_ratio(share.wall_seconds * len(share.nodes), one.seconds)} |",
        f"| FLOPs (est.) | {_si(node_flops)} on nodes + {_si(share.trainer_flops)} on the trainer | {_si(one.flops)} | "
        f"{_ratio(None if node_flops is None else node_flops + share.trainer_flops, one.flops)} |",
        f"| peak memory | {largest} largest node, {summed} all nodes | {_mib(one.peak_rss_bytes)} | "
        f"{_ratio(max(peaks) if peaks else None, one.peak_rss_bytes)} (largest node) |", "",
        f"One machine: {one.how}. FLOPs are the same work counted the same way (the trainer's embeddings, head and "
        "loss included); the swarm's extra cost is time and memory, not arithmetic.", "",
    ]
    return lines


def _ratio(swarm: float | None, one: float | None) -> str:
    return "—" if swarm is None or not one else f"{swarm / one:.2f}x"


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def plot_cost_share(share: CostShare, path: Path) -> None:
    """Bars of each node's share of compute seconds and of FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    labels = [node.node_id[:8] for node in share.nodes]
    xs = range(len(labels))
    axis.bar([x - 0.2 for x in xs], [node.compute_share for node in share.nodes], width=0.4, label="compute s")
    if share.node_flops:
        axis.bar([x + 0.2 for x in xs], [node.flops_share for node in share.nodes], width=0.4, label="FLOPs (est.)")
    axis.set_xticks(list(xs), labels)
    axis.set_ylabel("share of all nodes")
    axis.set_title("Per-node cost share")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
