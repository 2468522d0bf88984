"""Reading a job file: YAML to a validated `Job`, every problem a JobFileError that names the field; paths in
the file are relative to the file, not to the shell's directory."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from swarm.config.job import Job
from swarm.errors import JobFileError


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job file"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and the section it is in)"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def parse_job(data: object, source: str = "job") -> Job:
    if not isinstance(data, dict):
        raise JobFileError(f"{source}: a job file must be a YAML mapping, got {type(data).__name__}")
    try:
        return Job.model_validate(data)
    except ValidationError as error:
        raise JobFileError(format_validation_error(error, source)) from None


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem becomes a JobFileError naming the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise JobFileError(f"{path}: job file not found") from None
    except OSError as error:
        raise JobFileError(f"{path}: cannot read job file ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise JobFileError(f"{path}: not valid YAML: {error}") from None
    job = parse_job(data, str(path))
    if job.model.path is not None and not job.model.path.is_absolute():
        # Relative checkpoint and data paths are relative to the job file, not to the shell's directory.
        job = job.model_copy(update={"model": job.model.model_copy(update={"path": (path.parent / job.model.path).resolve()})})
    if job.model.adapter is not None and not job.model.adapter.is_absolute():
        job = job.model_copy(update={"model": job.model.model_copy(update={"adapter": (path.parent / job.model.adapter).resolve()})})
    if job.data.path is not None and not job.data.path.is_absolute():
        job = job.model_copy(update={"data": job.data.model_copy(update={"path": (path.parent / job.data.path).resolve()})})
    if job.sweep is not None and job.sweep.extras:
        extras = [extra if extra.run.is_absolute() else extra.model_copy(update={"run": (path.parent / extra.run).resolve()})
                  for extra in job.sweep.extras]
        job = job.model_copy(update={"sweep": job.sweep.model_copy(update={"extras": extras})})
    return job
