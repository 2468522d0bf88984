"""The `optimizer`, `training` and `eval` sections: how each step trains and how often the model is evaluated."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from swarm.config.strict import StrictModel


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


class TrainingSpec(StrictModel):
    steps: int | None = Field(None, ge=1, description="steps of the single LoRA phase of a job without phases")
    batch_size: int = Field(8, ge=1)
    micro_batches: int = Field(1, ge=1, description="the batch is split into this many micro-batches")
    pipeline: bool = Field(
        True, description="micro-batches are in flight at several ranges at once (one per range and replica lane), "
        "each node still adding their gradients up in micro-batch order; false: one at a time per lane")

    @model_validator(mode="after")
    def _micro_batches_divide_batch(self) -> TrainingSpec:
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"training.micro_batches ({self.micro_batches}) must divide training.batch_size ({self.batch_size})"
            )
        return self


class EvalSpec(StrictModel):
    every: int = Field(0, ge=0, description="evaluate every N steps within a phase (0: only at phase ends)")
    samples: int = Field(64, ge=1, le=10000, description="distinct held-out prompts per evaluated condition "
                         "(all there are when fewer; reveal asks its 4 held-out prompts)")
    max_new_tokens: int = Field(24, ge=1, le=512)
    batch_size: int = Field(64, ge=1)
    at_start: bool = Field(True, description="also evaluate before the first phase")
