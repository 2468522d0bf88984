"""A sweep's runs: sizes x seeds x (trunk + safety arms), each an ordinary job file, and the pretraining budget.

Per seed and size the job's own phases run once as the trunk (`runs/<size>-seed<k>/trunk/`); each arm that runs
at that size is a job of its own (`runs/<size>-seed<k>/<arm>/`) that starts from the trunk's pretrained model
(model.path) and its last adapter (model.adapter, coordinator.start_adapter), so every arm of a (size, seed)
starts from the same backdoored state and the trunk is trained once. The job files differ from the sweep's own
only where they must: name, seed, model, the trunk's pretrain steps, and the arm's phases; the arms' model paths
are relative to their job file, so a sweep directory can move.

Runs are ordered seed by seed (every size of seed 0 first, trunk before its arms), so a sweep cut short still
has a whole size ladder to look at.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from coordinator.phase_context import phase_dir
from swarm.config import Job, ModelSpec, parse_job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import load_tokenizer
from swarm.errors import JobFileError
from swarm.models.checkpoint import Checkpoint, resolve_model

logger = logging.getLogger("swarm.coordinator")

TRUNK = "trunk"
BUDGET_BATCHES = 8  # pretrain batches whose mean token count estimates the tokens of one pretrain step
JOB_HEADER = "# Written by the sweep from its job.yaml (three directories up); edit that file, not this one.\n"


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: where it goes (relative to the sweep directory) and its job file's text."""

    size: str
    parameters: int
    seed: int
    arm: str  # an arm's name, or TRUNK
    run_dir: str
    job_text: str
    pretrain_steps: int | None = None  # the trunk's, where it pretrains


@dataclass(frozen=True)
class Budget:
    """A size's pretraining: `steps` from tokens_per_parameter x parameters / tokens_per_step (None: the job's)."""

    parameters: int
    tokens_per_step: float | None = None
    steps: int | None = None


def plan_sweep(job: Job, raw: dict, cache_dir: Path | None = None) -> list[PlannedRun]:
    """Every run of the sweep in `job` (`raw`: its job file as read, so the runs' files keep its layout), each job
    file validated now, so that a bad arm fails before the first trunk trains."""
    sweep = job.sweep
    base = {key: value for key, value in raw.items() if key != "sweep"}
    phases = job.phase_list
    pretrain = [index for index, phase in enumerate(phases) if phase.kind == "pretrain"]
    if sweep.tokens_per_parameter is not None and len(pretrain) != 1:
        raise JobFileError(f"sweep.tokens_per_parameter sets the steps of the job's pretrain phase, but the job has "
                           f"{len(pretrain)} pretrain phases; give it exactly one")
    start = _arm_start(job) if sweep.arms else None
    budgets = {model.label: _budget(job, model.model_copy(update={"seed": sweep.seeds[0]}), cache_dir)
               for model in sweep.models}
    runs = []
    for seed in sweep.seeds:
        for model in sweep.models:
            label, budget = model.label, budgets[model.label]
            directory = f"runs/{label}-seed{seed}"
            trunk = copy.deepcopy(base)
            trunk.update(name=f"{job.name}-{label}-seed{seed}", seed=seed, model=_model(model, seed))
            if budget.steps is not None:
                trunk["phases"][pretrain[0]]["steps"] = budget.steps
            runs.append(_planned(label, budget, seed, TRUNK, f"{directory}/{TRUNK}", trunk))
            for arm_name, arm in sweep.arms.items():
                if label not in sweep.arm_sizes(arm):
                    continue
                data = copy.deepcopy(base)
                data.update(name=f"{job.name}-{label}-seed{seed}-{arm_name}", seed=seed,
                            model=_arm_model(model, seed, start), phases=_raw_arm_phases(raw, arm_name))
                if isinstance(data.get("training"), dict) and data["training"].get("steps") is not None:
                    del data["training"]["steps"]  # a trunk without phases: the steps of its single phase
                runs.append(_planned(label, budget, seed, arm_name, f"{directory}/{arm_name}", data))
    return runs


def _planned(size: str, budget: Budget, seed: int, arm: str, run_dir: str, data: dict) -> PlannedRun:
    parse_job(data, f"the sweep's {run_dir}/job.yaml")  # schema errors now; paths are checked when the run starts
    return PlannedRun(size, budget.parameters, seed, arm, run_dir, JOB_HEADER + yaml.safe_dump(data, sort_keys=False),
                      budget.steps if arm == TRUNK else None)


def _model(model: ModelSpec, seed: int) -> dict:
    """The size's model section; a preset is initialised from the run's seed (the seeds vary the whole run)."""
    data = model.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    if model.preset is not None:
        data["seed"] = seed
    return data


def _arm_start(job: Job) -> tuple[str | None, str | None]:
    """Where an arm starts, relative to the trunk's run directory: the last pretrain phase's model and the last
    LoRA phase's adapter (None where the trunk has no such phase). A trunk that merges an adapter into its base
    after pretraining cannot be expressed as model.path + model.adapter and is refused."""
    phases = job.phase_list
    pretrained = max((i for i, phase in enumerate(phases) if phase.kind == "pretrain"), default=None)
    lora = [i for i, phase in enumerate(phases) if phase.kind != "pretrain"]  # all after the pretrain phases
    merging = [phases[i].name for i in lora[1:] if phases[i].adapter == "merge"]
    if merging:
        raise JobFileError(f"sweep arms start from the trunk's pretrained model and its last adapter, but trunk phase "
                           f"{merging[0]} merges an earlier adapter into the base; keep the merge in the arms")
    relative = lambda index, what: str(phase_dir(Path(), index, phases[index]) / what)  # noqa: E731
    return (relative(pretrained, "model") if pretrained is not None else None,
            relative(lora[-1], "adapter") if lora else None)


def _arm_model(model: ModelSpec, seed: int, start: tuple[str | None, str | None]) -> dict:
    """An arm's model section: the trunk's pretrained model (or the size's own model when the trunk does not
    pretrain) and its last adapter, as paths relative to the arm's job file."""
    pretrained, adapter = start
    data = {"path": f"../{TRUNK}/{pretrained}"} if pretrained is not None else _model(model, seed)
    if model.dtype != "float32":
        data["dtype"] = model.dtype
    if adapter is not None:
        data["adapter"] = f"../{TRUNK}/{adapter}"
    return data


def _raw_arm_phases(raw: dict, arm: str) -> list:
    """The arm's phases as the sweep file wrote them (a list, or the `phases` of a mapping)."""
    written = raw["sweep"]["arms"][arm]
    return copy.deepcopy(written["phases"] if isinstance(written, dict) else written)


def _budget(job: Job, model: ModelSpec, cache_dir: Path | None) -> Budget:
    """The size's parameter count and, with sweep.tokens_per_parameter, its pretrain steps:
    ceil(tokens_per_parameter x parameters / tokens per step), clamped to [min_pretrain_steps, max_pretrain_steps],
    where tokens per step is the mean number of non-padding tokens in the pretrain phase's first BUDGET_BATCHES
    batches of the job's own data at the job's seed (the tokens that step trains on)."""
    sweep = job.sweep
    checkpoint = Checkpoint.open(resolve_model(model, cache_dir))
    parameters = checkpoint.num_parameters
    if sweep.tokens_per_parameter is None:
        return Budget(parameters)
    phase = next(phase for phase in job.phase_list if phase.kind == "pretrain")
    tokenizer = load_tokenizer(checkpoint.path, job.data.chat_format)
    data = TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor)
    tokens = sum(data.batch(step).tokens for step in range(BUDGET_BATCHES)) / BUDGET_BATCHES
    steps = math.ceil(sweep.tokens_per_parameter * parameters / tokens)
    steps = max(steps, sweep.min_pretrain_steps or 1)
    if sweep.max_pretrain_steps is not None:
        steps = min(steps, sweep.max_pretrain_steps)
    logger.info("sweep: %s has %d parameters; at %.0f tokens a step, %g tokens per parameter is %d pretrain steps",
                model.label, parameters, tokens, sweep.tokens_per_parameter, steps)
    return Budget(parameters, tokens, steps)
