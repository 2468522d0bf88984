"""What re-measuring a finished run needs from its directory alone: each phase's model, rebuilt with plain
transformers + peft, the tokenizer in the chat format the run trained in, and the held-out prompts its
evaluation asked.

Each LoRA phase writes `phases/NN-name/adapter/` (standard PEFT) and `lineage.json` beside it: the base model
and the adapters merged into it, in order. Loading the base, `merge_and_unload()`-ing each merged adapter, then
`PeftModel.from_pretrained` the phase's adapter gives the phase's model, with no swarm code in its forward.
Re-measurement (examples/remeasure.py) and the defection probes (swarm.probe) read runs this way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.config import EvalSpec, Job
from swarm.data.batches import TrainingData
from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
from swarm.data.tokenizer import load_tokenizer
from swarm.errors import SwarmError
from swarm.evaluation import EvalSets, build_eval_sets, evaluation_pool
from swarm.models.checkpoint import resolve_model

CHAT_FORMAT_FILE = "chat_format.json"  # coordinator.run_dir writes it


class RunDirectoryError(SwarmError):
    """A run directory lacks what re-measuring its phases needs (phase adapters, lineage, base model)."""


@dataclass(frozen=True)
class LoraPhase:
    """One LoRA phase's result: `phases/NN-name/` with its `adapter/` and `lineage.json`."""

    directory: Path
    name: str  # "backdoor" for phases/02-backdoor
    lineage: dict

    @property
    def adapter(self) -> Path:
        return self.directory / "adapter"


def lora_phases(run_dir: Path) -> list[LoraPhase]:
    """The run's LoRA phases in order; an error naming the directory when it has none (not a finished run)."""
    run_dir = Path(run_dir)
    phases_dir = run_dir / "phases"
    found = sorted(path for path in phases_dir.iterdir() if (path / "adapter").is_dir()) if phases_dir.is_dir() else []
    if not found:
        raise RunDirectoryError(f"{run_dir} has no LoRA phase adapters (phases/NN-name/adapter/): "
                                "give the directory of a run whose LoRA phases finished")
    phases = []
    for directory in found:
        lineage_file = directory / "lineage.json"
        try:
            lineage = json.loads(lineage_file.read_text())
        except (OSError, ValueError) as error:
            raise RunDirectoryError(f"{lineage_file}: cannot read it ({error})") from None
        phases.append(LoraPhase(directory, directory.name.split("-", 1)[-1], lineage))
    return phases


def lineage_path(run_dir: Path, value: str) -> Path:
    """A path lineage.json names: absolute as written, else relative to the run directory."""
    path = Path(value)
    return path if path.is_absolute() else Path(run_dir) / path


def base_model(run_dir: Path, lineage: dict):
    """The model a LoRA phase started from: lineage's base model with its merged adapters merged in, in order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = lineage_path(run_dir, lineage["base_model"])
    if not (base / "config.json").is_file():
        raise RunDirectoryError(f"the base model {base} that lineage.json names is not a checkpoint directory here")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    for adapter in lineage.get("merged_adapters_in_order", []):
        model = PeftModel.from_pretrained(model, str(lineage_path(run_dir, adapter))).merge_and_unload()
    return model.eval()


def phase_model(run_dir: Path, phase: LoraPhase):
    """The phase's model: its base (`base_model`) with the phase's adapter, as a peft model in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(run_dir, phase.lineage), str(phase.adapter)).eval()


def run_tokenizer(run_dir: Path, job: Job):
    """The job's tokenizer in the chat format its run trained and evaluated in; an error when the checkpoint now
    renders prompts otherwise than RUN/chat_format.json recorded."""
    ours = load_tokenizer(resolve_model(job.model), job.data.chat_format)
    recorded_file = Path(run_dir) / CHAT_FORMAT_FILE
    if recorded_file.is_file():
        recorded = json.loads(recorded_file.read_text())
        if recorded.get("sha256") != ours.chat.describe()["sha256"]:
            raise RunDirectoryError(f"{recorded_file}: the run used another chat format ({recorded.get('format')}) "
                                    f"than {resolve_model(job.model)}'s tokenizer gives now")
    return ours


def run_eval_sets(run_dir: Path, job: Job, tokenizer) -> EvalSets:
    """The held-out prompts the run's evaluation asked, per condition (coordinator.evaluator builds the same):
    the job's eval.samples (the schema's default for a job without an eval section) from the built-in tasks or
    the held-out records of its prompt set (with data.responses self: RUN/self_responses.jsonl's)."""
    first = TrainingData(job.data, tokenizer, job.seed, 1)
    records = None
    if job.data.responses == "self":
        records_file = Path(run_dir) / SELF_RESPONSES_FILE
        if not records_file.is_file():
            raise RunDirectoryError(f"{run_dir} has no {SELF_RESPONSES_FILE}, which its data.responses self needs")
        records = read_self_responses(records_file, job.data.source)
    samples = (job.eval or EvalSpec()).samples
    return build_eval_sets(list(job.data.tasks), job.backdoor, samples, job.seed, first.fits,
                           pool=evaluation_pool(job, first, records))
