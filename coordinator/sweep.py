"""Running a sweep (coordinator.sweep_plan): every run in its own directory, an index of them, resumable.

SWEEP_DIR/sweep.json lists every planned run, {"size", "parameters", "seed", "arm" (an arm's name or "trunk"),
"run_dir" (relative to SWEEP_DIR), "seconds" (wall time, summed over its attempts), "finished",
"pretrain_steps" (trunks)}, rewritten atomically after each run; a run is finished when it returned, or when its
directory holds the report a run writes last. `swarm-coordinator resume SWEEP_DIR` plans the sweep again from
SWEEP_DIR/job.yaml, skips finished runs, continues a run that had started (coordinator.resume: it has an audit
log) and starts the others afresh. Once every run is done, coordinator.sweep_report writes sweep.md and the
figures from the runs' directories.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.sweep_plan import PlannedRun
from swarm.config.sweep import IMPLANTED_MIN
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.coordinator")

SWEEP_INDEX = "sweep.json"
RUN_DONE_FILE = "report.md"  # the last file a run writes (coordinator.job_runner)


class SweepError(SwarmError):
    """A sweep directory that cannot be continued as it is (a run's job file changed since it started)."""


def run_sweep(sweep_dir: Path, planned: list[PlannedRun], run_fresh: Callable[[Path], object],
              resume_run: Callable[[Path], object], implanted_min: float = IMPLANTED_MIN,
              extras: list[dict] = ()) -> list[dict]:
    """Run every planned run not finished yet, in order: `run_fresh(run_dir)` for a directory that holds only
    its job.yaml, `resume_run(run_dir)` for one whose run had started. The report is rewritten after every run
    that finishes (the unfinished listed as such), so a long sweep shows its result so far. `extras`: finished
    rows of other families' runs (coordinator.sweep_extras), indexed after the planned runs. Returns sweep.json's
    rows."""
    rows = _rows(sweep_dir, planned) + [dict(row) for row in extras]
    _write_index(sweep_dir, rows)
    for number, (run, row) in enumerate(zip(planned, rows), start=1):
        run_dir = sweep_dir / run.run_dir
        if not row["finished"] and (run_dir / RUN_DONE_FILE).is_file() and (run_dir / "audit.db").is_file():
            row["finished"] = True  # it ended after the index was last written
            _write_index(sweep_dir, rows)
        if row["finished"] and not any((run_dir / name).is_file() for name in (RUN_DONE_FILE, "metrics.jsonl")):
            logger.warning("sweep: %s is indexed as finished but its records are gone; running it again",
                           run.run_dir)
            row["finished"], row["seconds"] = False, 0.0
            _write_index(sweep_dir, rows)
        if row["finished"]:
            logger.info("sweep: %s already finished (%d of %d)", run.run_dir, number, len(planned))
            continue
        started = _prepare(run_dir, run)
        logger.info("sweep: %s %s (%d of %d)", "resuming" if started else "running", run.run_dir, number,
                    len(planned))
        clock = time.monotonic()
        try:
            (resume_run if started else run_fresh)(run_dir)
            row["finished"] = True
        finally:
            row["seconds"] = round(row["seconds"] + time.monotonic() - clock, 1)
            _write_index(sweep_dir, rows)
        logger.info("sweep: %s finished in %.0f s (%d of %d)", run.run_dir, row["seconds"], number, len(planned))
        if number < len(planned):
            _report(sweep_dir, rows, implanted_min, interim=True)
    _report(sweep_dir, rows, implanted_min)
    return rows


def _rows(sweep_dir: Path, planned: list[PlannedRun]) -> list[dict]:
    """sweep.json's rows for the plan, keeping the time and state an earlier attempt recorded."""
    path = sweep_dir / SWEEP_INDEX
    earlier = {row["run_dir"]: row for row in json.loads(path.read_text())} if path.is_file() else {}
    rows = []
    for run in planned:
        before = earlier.get(run.run_dir, {})
        rows.append({"size": run.size, "parameters": run.parameters, "seed": run.seed, "arm": run.arm,
                     "run_dir": run.run_dir, "seconds": float(before.get("seconds", 0.0)),
                     "finished": bool(before.get("finished", False)), "pretrain_steps": run.pretrain_steps})
    return rows


def _prepare(run_dir: Path, run: PlannedRun) -> bool:
    """Ready `run_dir` for its run; True when the run had started (its audit log exists) and is to be resumed,
    which needs its job file unchanged. A directory whose run never started is emptied and started afresh."""
    job_file = run_dir / "job.yaml"
    if (run_dir / "audit.db").is_file():
        if not job_file.is_file() or job_file.read_text() != run.job_text:
            raise SweepError(f"{job_file} is not the job file the sweep gives for this run now (was the sweep's "
                             f"job.yaml edited?); restore it, or move {run_dir} away to run it afresh")
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    job_file.write_text(run.job_text)
    return False


def _write_index(sweep_dir: Path, rows: list[dict]) -> None:
    path = sweep_dir / SWEEP_INDEX
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(partial, path)


def _report(sweep_dir: Path, rows: list[dict], implanted_min: float, interim: bool = False) -> None:
    try:
        from coordinator.sweep_report import write_sweep_report
    except ModuleNotFoundError as error:  # the report module is optional to running the sweep
        if error.name != "coordinator.sweep_report":
            raise
        logger.warning("sweep: no report written (%s); the runs are indexed in %s", error, sweep_dir / SWEEP_INDEX)
        return
    path = write_sweep_report(sweep_dir, rows, wall_seconds=sum(row["seconds"] for row in rows),
                              implanted_min=implanted_min)
    if interim:
        planned = [row for row in rows if not row.get("extra")]
        done = sum(row["finished"] for row in planned)
        logger.info("sweep: report so far (%d of %d runs): %s", done, len(planned), path)
    else:
        logger.info("sweep complete: %s", path)
