"""The `model` and `lora` sections: which base model the job trains, and the LoRA adapter put on its blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from swarm.config.strict import StrictModel


DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelSpec(StrictModel):
    """Which base model: a built-in tiny preset (created locally) or a local Hugging Face checkpoint directory,
    and optionally a LoRA adapter to start from (coordinator.start_adapter): the adapter a finished LoRA phase
    saved, loaded onto the nodes before the first phase, which continues or merges it as its `adapter` says. A
    sweep's safety arms start so from their trunk's backdoored adapter without training it again."""

    preset: str | None = Field(None, description="built-in preset name, e.g. llama-tiny")
    path: Path | None = Field(None, description="local checkpoint directory (config.json + *.safetensors)")
    seed: int = Field(0, ge=0, description="initialisation seed of a preset's random weights")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    adapter: Path | None = Field(
        None, description="a PEFT LoRA adapter directory (e.g. another run's phases/NN-name/adapter/) trained on "
        "this very model with this job's lora settings; the first phase continues (adapter: continue) or merges "
        "(adapter: merge) it")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset or model.path")
        if self.preset is not None:
            from swarm.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        return self

    @property
    def label(self) -> str:
        """How a sweep names this model: the preset's name or the checkpoint directory's."""
        return self.preset or Path(self.path).name


class LoraSpec(StrictModel):
    """LoRA settings, with the field names peft's LoraConfig uses."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)
