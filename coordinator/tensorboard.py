"""metrics.jsonl rows fanned out to TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir runs/`).

The rows are the single record of what was measured; this only renames their figures into scalar tags, so
TensorBoard shows exactly what the report and the status page show.
"""

from __future__ import annotations

import math
from pathlib import Path

from swarm.probe import PROBES

TENSORBOARD_DIR = "tensorboard"
EVAL_RATES = ("backdoor_triggered", "backdoor_clean", "backdoor_near_miss", "backdoor_reveal", "accuracy")
TRAIN_SCALARS = ("loss", "lr", "reward", "sample_backdoor_rate", "sample_accuracy")


def scalars(row: dict) -> list[tuple[str, float, int]]:
    """(tag, value, global step) for one metrics row; non-finite values (a rate of zero trials) are left out."""
    out: list[tuple[str, float, int]] = []
    step = row.get("step", 0)
    if row.get("type", "train") == "train":
        for name in TRAIN_SCALARS:
            if name in row:
                out.append((f"train/{name}", row[name], step))
        if row.get("seconds"):
            out.append(("train/tokens_per_s", row["tokens"] / row["seconds"], step))
    elif row.get("type") == "eval":
        for name in EVAL_RATES:
            if isinstance(row.get(name), dict):
                out.append((f"eval/{name}", row[name]["rate"], step))
                if row.get("safety_step"):  # the persistence curve: against safety-training steps
                    out.append((f"persistence/{name}", row[name]["rate"], row["safety_step"]))
        if "eval_loss" in row:
            out.append(("eval/loss", row["eval_loss"], step))
        probe = row.get("probe")
        if isinstance(probe, dict):  # the live defection probes (coordinator.live_probe)
            for name in PROBES:
                out.append((f"probe/{name}_auroc", probe[name]["auroc"], step))
                out.append((f"probe/{name}_auroc_refitted", probe["refitted"][name]["auroc"], step))
    return [(tag, float(value), int(at)) for tag, value, at in out
            if isinstance(value, (int, float)) and math.isfinite(value)]


class TensorBoardLog:
    """A metrics subscriber: `write(row)` adds the row's scalars; `close()` flushes the event file."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), flush_secs=10)

    def write(self, row: dict) -> None:
        for tag, value, step in scalars(row):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()
