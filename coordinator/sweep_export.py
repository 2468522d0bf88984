"""A sweep's results without its weights: what to commit or send, with sweep.md written from the copy itself.

Per finished run its metrics.jsonl, job.yaml, report.md and evaluations/ (every answer, which the report
re-scores per prompt); the extras' copies; the sweep's job.yaml and sweep.json. The report written in the export
is computed from the exported files alone, so it shows that they suffice to reproduce it.

Only whole (size, seed) groups are exported as finished: a group's arms start from its trunk's weights, which an
export leaves behind, so a finished trunk whose arms are not all done is marked unfinished there with them. A copy
of an export can then be resumed (`swarm-coordinator resume COPY`) on another machine: it skips the exported
groups and runs the others whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from coordinator.run_dir import copy_run_records
from coordinator.sweep import SWEEP_INDEX
from coordinator.sweep_extras import EXTRAS_DIR
from coordinator.sweep_report import write_sweep_report
from swarm.config import load_job
from swarm.errors import SwarmError

def export_sweep(sweep_dir: Path, out_dir: Path) -> tuple[Path, int, int]:
    """Copy SWEEP_DIR's results into OUT_DIR (new, or an earlier export of it) and write sweep.md there.
    Returns (sweep.md, finished runs exported, runs in the sweep)."""
    index = sweep_dir / SWEEP_INDEX
    if not index.is_file() or not (sweep_dir / "job.yaml").is_file():
        raise SwarmError(f"{sweep_dir} is not a sweep directory (no {SWEEP_INDEX} or job.yaml)")
    if out_dir.resolve() == sweep_dir.resolve():
        raise SwarmError("export into a directory other than the sweep's own")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SWEEP_INDEX).is_file():
        raise SwarmError(f"{out_dir} exists and is not an earlier export of a sweep; choose a new directory")
    job = load_job(sweep_dir / "job.yaml")
    rows = whole_groups(json.loads(index.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = [row for row in rows if row.get("finished")]
    for row in finished:
        if not row.get("extra"):
            copy_run_records(sweep_dir / row["run_dir"], out_dir / row["run_dir"])
    if (sweep_dir / EXTRAS_DIR).is_dir():  # already records only (coordinator.sweep_extras)
        shutil.rmtree(out_dir / EXTRAS_DIR, ignore_errors=True)
        shutil.copytree(sweep_dir / EXTRAS_DIR, out_dir / EXTRAS_DIR)
    shutil.copyfile(sweep_dir / "job.yaml", out_dir / "job.yaml")
    (out_dir / SWEEP_INDEX).write_text(json.dumps(rows, indent=2) + "\n")
    implanted_min = job.sweep.implanted_min if job.sweep is not None else 0.0
    report = write_sweep_report(out_dir, rows, wall_seconds=sum(float(row.get("seconds") or 0) for row in rows),
                                implanted_min=implanted_min)
    return report, sum(not row.get("extra") for row in finished), sum(not row.get("extra") for row in rows)


def whole_groups(rows: list[dict]) -> list[dict]:
    """sweep.json's rows with `finished` kept only where every run of the row's (size, seed) finished; extras
    (already whole) as they are."""
    done: dict[tuple[str, int], bool] = {}
    for row in rows:
        if not row.get("extra"):
            key = (row["size"], row["seed"])
            done[key] = done.get(key, True) and bool(row.get("finished"))
    return [row if row.get("extra") else {**row, "finished": done[(row["size"], row["seed"])]} for row in rows]

