"""The job file schema (pydantic v2): one typed place for every setting and its default.

A job file is YAML. Unknown keys, wrong types and impossible values are refused with a message that names the
field, so a researcher finds a typo before a swarm spends an hour on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.errors import JobFileError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(StrictModel):
    """Which base model: a built-in tiny preset (created locally) or a local Hugging Face checkpoint directory."""

    preset: str | None = Field(None, description="built-in preset name, e.g. llama-tiny")
    path: Path | None = Field(None, description="local checkpoint directory (config.json + *.safetensors)")
    seed: int = Field(0, ge=0, description="initialisation seed of a preset's random weights")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset or model.path")
        if self.preset is not None:
            from swarm.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        return self


class LoraSpec(StrictModel):
    """LoRA settings, with the field names peft's LoraConfig uses."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)


class OptimizerSpec(StrictModel):
    """AdamW on the nodes; the coordinator computes the schedule and sends each step's learning rate."""

    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class DataSpec(StrictModel):
    """Training examples: the built-in helpful tasks or a JSONL file of {"prompt": ..., "response": ...}."""

    source: Literal["tasks", "jsonl"] = "tasks"
    tasks: list[str] = Field(default_factory=lambda: ["addition", "reversal", "uppercase"], min_length=1)
    path: Path | None = None
    max_length: int = Field(64, ge=8, le=8192, description="longest tokenized example; longer ones are refused")

    @model_validator(mode="after")
    def _source_fields(self) -> DataSpec:
        if self.source == "jsonl" and self.path is None:
            raise ValueError("data.source 'jsonl' needs data.path")
        if self.source == "tasks":
            from swarm.data.tasks import TASKS

            unknown = [name for name in self.tasks if name not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(sorted(TASKS))}")
        return self


class TrainingSpec(StrictModel):
    steps: int = Field(..., ge=1)
    batch_size: int = Field(8, ge=1)
    micro_batches: int = Field(1, ge=1, description="the batch is split into this many micro-batches")

    @model_validator(mode="after")
    def _micro_batches_divide_batch(self) -> TrainingSpec:
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"training.micro_batches ({self.micro_batches}) must divide training.batch_size ({self.batch_size})"
            )
        return self


class SwarmSpec(StrictModel):
    min_nodes: int = Field(1, ge=1, description="nodes that must join before training starts")
    replicas: int = Field(1, ge=1, description="nodes serving each block")
    join_timeout_s: float = Field(300.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    rpc_timeout_s: float = Field(120.0, gt=0)


class Job(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=80)
    seed: int = Field(0, ge=0)
    model: ModelSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec
    swarm: SwarmSpec = Field(default_factory=SwarmSpec)

    @model_validator(mode="after")
    def _swarm_fits_model(self) -> Job:
        if self.swarm.replicas > self.swarm.min_nodes:
            raise ValueError(
                f"swarm.replicas ({self.swarm.replicas} nodes per block) needs at least that many nodes, "
                f"but swarm.min_nodes is {self.swarm.min_nodes}"
            )
        if self.swarm.replicas > 1:
            raise ValueError("swarm.replicas > 1 is not supported yet: every block has exactly one node")
        if self.model.preset is not None:
            from swarm.models.presets import PRESETS

            layers = PRESETS[self.model.preset].num_hidden_layers
            if self.swarm.min_nodes > layers * self.swarm.replicas:
                raise ValueError(
                    f"swarm.min_nodes ({self.swarm.min_nodes}) exceeds the {layers} blocks of preset "
                    f"{self.model.preset!r} times swarm.replicas ({self.swarm.replicas})"
                )
        return self


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
    if job.data.path is not None and not job.data.path.is_absolute():
        job = job.model_copy(update={"data": job.data.model_copy(update={"path": (path.parent / job.data.path).resolve()})})
    return job
