"""The run directory: the job file it ran, metrics.jsonl (one row per optimizer step), adapters, node logs."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable

import yaml

from swarm.errors import SwarmError


def create_run_dir(root: Path, job_name: str, job_file: Path, explicit: Path | None = None) -> Path:
    if explicit is not None:
        run_dir = explicit
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"run directory {run_dir} exists and is not empty (to go on with the run or sweep in "
                                  f"it: swarm-coordinator resume {run_dir})")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = root / f"{job_name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = root / f"{job_name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(job_text_for_run(Path(job_file)))
    return run_dir


def job_text_for_run(job_file: Path) -> str:
    """The job file as the run directory keeps it: verbatim, unless it names a model, adapter, data or sweep
    extra's run path relative to its own directory, which would resolve against the run directory on resume, replay or re-measurement; those
    are made absolute."""
    text = job_file.read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        return text
    sweep = data.get("sweep") if isinstance(data.get("sweep"), dict) else {}
    sections = [(data.get("model"), "path"), (data.get("model"), "adapter"), (data.get("data"), "path"),
                *((model, "path") for model in sweep.get("models") or []),
                *((extra, "run") for extra in sweep.get("extras") or [])]
    changed = False
    for section, key in sections:
        if isinstance(section, dict) and isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
            section[key] = str((job_file.resolve().parent / section[key]).resolve())
            changed = True
    if not changed:
        return text
    return (f"# {job_file}, its relative paths made absolute for this run directory\n"
            + yaml.safe_dump(data, sort_keys=False))


RECORD_FILES = ("metrics.jsonl", "job.yaml", "report.md")  # with evaluations/: what a run's results rest on


def copy_run_records(source: Path, target: Path) -> None:
    """Copy a run's records (RECORD_FILES that exist, and evaluations/ with every answer) into `target`, replacing
    what an earlier copy left there; weights, checkpoints and the audit log stay behind."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    if (source / "evaluations").is_dir():
        shutil.rmtree(target / "evaluations", ignore_errors=True)
        shutil.copytree(source / "evaluations", target / "evaluations")


CHAT_FORMAT_FILE = "chat_format.json"


class ChatFormatChanged(SwarmError):
    """A resumed run's checkpoint renders prompts differently from what its first part trained on."""


def record_chat_format(run_dir: Path, description: dict) -> bool:
    """Write RUN/chat_format.json (the template or built-in format examples are rendered with, so replay and
    re-measurement render the same text); True when written now. A resumed run must render as before."""
    path = run_dir / CHAT_FORMAT_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before.get("sha256") != description["sha256"] or before.get("format") != description["format"]:
            raise ChatFormatChanged(
                f"{path}: this run was trained in chat format {before.get('format')} (sha256 {before.get('sha256')}), "
                f"but its checkpoint now gives {description['format']} (sha256 {description['sha256']})")
        return False
    path.write_text(json.dumps(description, indent=2))
    return True


class MetricsLog:
    """Appends one JSON object a line and flushes it to disk, so a crash loses at most the row being written.

    `subscribers` (objects with `write(row)` and `close()`, e.g. TensorBoard) get each row once it is on disk:
    metrics are written once, here, and fanned out from here.
    """

    def __init__(self, path: Path, subscribers: tuple = ()):
        self.path = path
        self.subscribers = list(subscribers)
        self._handle = open(path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self._handle.write(json.dumps(row, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        for subscriber in self.subscribers:
            subscriber.write(row)

    def rewind(self, keep: Callable[[dict], bool]) -> None:
        """Drop the rows `keep` refuses (steps about to be redone after a rollback). Subscribers keep what
        they were given."""
        self._handle.close()
        keep_metrics(self.path, keep)
        self._handle = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self._handle.close()
        for subscriber in self.subscribers:
            subscriber.close()


def done_before(step: int) -> Callable[[dict], bool]:
    """Whether a metrics row records work done before global step `step` was applied: a train row of an
    earlier step, or an evaluation after at most `step` steps."""
    def keep(row: dict) -> bool:
        done = row.get("step")
        return isinstance(done, int) and (done < step if row.get("type") == "train" else done <= step)

    return keep


def keep_metrics(path: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrite metrics.jsonl with only the rows `keep` accepts (replaced atomically; a row cut short by a
    crash goes too); returns the rows kept."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and keep(row):
            kept.append(row)
    partial = path.with_name(path.name + ".rewrite")
    with open(partial, "w") as handle:
        handle.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return kept


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def nan_to_null(value):
    """A metrics value with NaN and infinities (a rate of zero trials is NaN) as None, for the consumers that
    refuse them: signed audit payloads and browsers' JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_null(item) for item in value]
    return value
