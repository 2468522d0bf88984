"""A whole job file: every section with its defaults, and the checks that span sections (phases against
`training`, the swarm's size against the model's blocks)."""

from __future__ import annotations

from pydantic import Field, model_validator

from swarm.config.data import BackdoorSpec, DataSpec
from swarm.config.deployment import AuditSpec, CompressionSpec, NodesSpec, SwarmSpec
from swarm.config.model import LoraSpec, ModelSpec
from swarm.config.oversight import OversightSpec
from swarm.config.phases import PhaseSpec
from swarm.config.strict import StrictModel
from swarm.config.sweep import SweepSpec
from swarm.config.training import EvalSpec, OptimizerSpec, TrainingSpec


class Job(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=80)
    seed: int = Field(0, ge=0)
    model: ModelSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    phases: list[PhaseSpec] | None = Field(None, min_length=1)
    backdoor: BackdoorSpec = Field(default_factory=BackdoorSpec)
    eval: EvalSpec | None = Field(None, description="evaluation settings; absent: no generation-based evaluation")
    swarm: SwarmSpec = Field(default_factory=SwarmSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    nodes: NodesSpec = Field(default_factory=NodesSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    oversight: OversightSpec = Field(default_factory=OversightSpec)
    sweep: SweepSpec | None = None

    @property
    def phase_list(self) -> list[PhaseSpec]:
        """The phases to run, with unique names and their batch size resolved (`training.batch_size` unless the
        phase sets its own); a job without `phases` is one LoRA `sft` phase. Code reads phases only from here."""
        if self.phases is None:
            return [PhaseSpec(kind="sft", name="train", steps=self.training.steps, batch_size=self.training.batch_size)]
        named, counts = [], {}
        for phase in self.phases:
            base = phase.name or phase.kind
            counts[base] = counts.get(base, 0) + 1
            name = base if phase.name or counts[base] == 1 else f"{base}-{counts[base]}"
            named.append(phase.model_copy(update={"name": name,
                                                  "batch_size": phase.batch_size or self.training.batch_size}))
        return named

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phase_list)

    @model_validator(mode="after")
    def _phases_or_steps(self) -> Job:
        if self.phases is None and self.training.steps is None:
            raise ValueError("give training.steps (one LoRA phase) or a list of phases")
        if self.phases is not None and self.training.steps is not None:
            raise ValueError("training.steps applies only to jobs without phases; set steps per phase")
        if self.phases is not None:
            names = [p.name for p in self.phases if p.name]
            if len(names) != len(set(names)):
                raise ValueError("phase names must be unique")
            seen_lora = False
            for index, phase in enumerate(self.phases):
                if phase.kind == "pretrain" and seen_lora:
                    raise ValueError(f"phases.{index}: pretrain must come before every LoRA phase")
                seen_lora |= phase.kind != "pretrain"
                if phase.batch_size and phase.batch_size % self.training.micro_batches:
                    raise ValueError(f"phases.{index}.batch_size must be a multiple of training.micro_batches")
        return self

    @model_validator(mode="after")
    def _probe_needs_evaluation(self) -> Job:
        if self.oversight.probe and self.eval is None:
            raise ValueError("oversight.probe measures the probes on evaluation's prompts at each evaluation; "
                             "add an eval section or set oversight.probe: false")
        return self

    @model_validator(mode="after")
    def _swarm_fits_model(self) -> Job:
        replicas = 1 if self.swarm.replicas == "auto" else self.swarm.replicas
        if replicas < 1:
            raise ValueError(f"swarm.replicas must be >= 1 or auto, not {replicas}")
        stages = self.swarm.stages or 1
        if stages * replicas > self.swarm.min_nodes:
            raise ValueError(
                f"swarm.stages ({stages}) x swarm.replicas ({replicas}) needs {stages * replicas} nodes, "
                f"but swarm.min_nodes is {self.swarm.min_nodes}"
            )
        from swarm.models.presets import PRESETS

        models = [self.model] + (list(self.sweep.models) if self.sweep else [])
        for model in models:
            if model.preset is None:
                continue
            layers = PRESETS[model.preset].num_hidden_layers
            if self.swarm.stages is not None and self.swarm.stages > layers:
                raise ValueError(f"swarm.stages ({self.swarm.stages}) exceeds the {layers} blocks of preset "
                                 f"{model.preset!r}")
            if self.swarm.replicas != "auto" and self.swarm.min_nodes > layers * replicas:
                raise ValueError(
                    f"swarm.min_nodes ({self.swarm.min_nodes}) exceeds the {layers} blocks of preset "
                    f"{model.preset!r} times swarm.replicas ({replicas})"
                )
        return self
