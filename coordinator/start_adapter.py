"""A run that starts from a saved LoRA adapter (`model.adapter`): checked, copied into the run, loaded onto the nodes.

A sweep's safety arms start from their trunk's backdoored adapter this way, so every arm of a (size, seed) trains
from the same state without pretraining and backdooring again. The adapter must be one trained on exactly this
base model with this job's LoRA settings; anything else is refused before a process starts, naming the adapter.

The run keeps its own copy in RUN/start_adapter/ (a `checkpoint` audit event records its SHA-256 and where it
came from), so the run directory stays self-contained. The phase loop treats it as the adapter a previous phase
left: the first phase continues it or merges it into the base (lineage.json then lists it among the merged
adapters), `swarm-audit replay` re-merges the recorded file, and examples/remeasure.py rebuilds the model from
lineage.json alone; every lineage.json of the run names the starting adapter and its SHA-256. It is also taken
as backdoored: the run's sft, adversarial and rl phases count as safety training (the metrics' safety_step).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.node_restore import restore_blocks
from swarm.audit.log import AuditLog
from swarm.config import Job
from swarm.errors import JobFileError
from swarm.lora import adapter_sha256, adapter_state, load_peft_adapter, lora_block_stack, peft_config
from swarm.models.checkpoint import DTYPES, Checkpoint

if TYPE_CHECKING:
    from coordinator.phase_context import PhaseContext

START_ADAPTER_DIR = "start_adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class StartAdapterError(JobFileError):
    """model.adapter is not an adapter this job's model and LoRA settings can start from."""


def check_start_adapter(job: Job, checkpoint: Checkpoint) -> None:
    """Refuse, in one line naming the adapter, a directory that is not a PEFT adapter, one of another LoRA rank,
    alpha or target modules, one whose tensors do not fit this model's blocks, and one trained on other base
    weights or on top of merged adapters (which model.path cannot express)."""
    directory = job.model.adapter
    if directory is None:
        return
    if any(phase.kind == "pretrain" for phase in job.phase_list):
        raise StartAdapterError(f"model.adapter {directory}: a job that starts from an adapter trains LoRA phases "
                                f"only; pretrain (with the adapter in every block) is not one")
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise StartAdapterError(f"model.adapter {directory}: not a LoRA adapter directory (no {missing[0]}); give "
                                f"a finished LoRA phase's phases/NN-name/adapter/")
    config, tensors = load_peft_adapter(directory)
    spec = job.lora
    if (config.get("r"), float(config.get("lora_alpha", 0))) != (spec.r, spec.alpha):
        raise StartAdapterError(f"model.adapter {directory} has LoRA r={config.get('r')}, alpha="
                                f"{config.get('lora_alpha')}, but this job's lora is r={spec.r}, alpha={spec.alpha:g}; "
                                f"set lora to the adapter's")
    expected = peft_config(spec, family=checkpoint.family).target_modules
    if set(config.get("target_modules") or []) != set(expected):
        raise StartAdapterError(f"model.adapter {directory} targets {sorted(config.get('target_modules') or [])}, "
                                f"but this job's lora.target_modules give {sorted(expected)}")
    stack = lora_block_stack(checkpoint, 0, checkpoint.num_blocks, spec, job.seed, DTYPES[job.model.dtype])
    shapes = {name: tuple(param.shape) for name, param in adapter_state(stack).items()}
    del stack
    wrong = sorted(set(shapes) ^ set(tensors)) or sorted(n for n in shapes if tuple(tensors[n].shape) != shapes[n])
    if wrong:
        raise StartAdapterError(f"model.adapter {directory} does not fit model {checkpoint.path}: tensor {wrong[0]} "
                                f"is {'missing or extra' if wrong[0] not in shapes or wrong[0] not in tensors else 'of another shape'}; "
                                f"it was trained on another model")
    lineage_file = directory.parent / "lineage.json"
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    if lineage.get("merged_adapters_in_order"):
        raise StartAdapterError(f"model.adapter {directory} was trained on top of {len(lineage['merged_adapters_in_order'])} "
                                f"merged adapter(s) ({lineage_file}); model.path must then be that base with them "
                                f"merged, which a run cannot start from")
    trained_on = lineage.get("base_model") or config.get("base_model_name_or_path")
    if trained_on and Path(trained_on).is_dir() and not _same_weights(Path(trained_on), checkpoint.path):
        raise StartAdapterError(f"model.adapter {directory} was trained on {trained_on}, whose weights differ from "
                                f"this job's model {checkpoint.path}")


def _same_weights(first: Path, second: Path) -> bool:
    """Whether two checkpoint directories hold the same weights files (by SHA-256 when they are not one)."""
    if first.resolve() == second.resolve():
        return True
    files = [sorted(path.glob("*.safetensors")) for path in (first, second)]
    if [path.name for path in files[0]] != [path.name for path in files[1]]:
        return False
    return all(_sha256(a) == _sha256(b) for a, b in zip(*files))


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def install_start_adapter(job: Job, run_dir: Path) -> Path | None:
    """RUN/start_adapter/, the run's copy of model.adapter (made once: a resumed run keeps the copy it started
    from); None without model.adapter."""
    if job.model.adapter is None:
        return None
    target = run_dir / START_ADAPTER_DIR
    if not all((target / name).is_file() for name in ADAPTER_FILES):
        staging = run_dir / f".{START_ADAPTER_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name in ADAPTER_FILES:
            shutil.copyfile(job.model.adapter / name, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def start_adapter_record(job: Job, run_dir: Path) -> dict | None:
    """What lineage.json and the audit log say of the starting adapter: where it came from, the run's copy, the
    SHA-256 of its weights file and of its tensors (float32, PEFT names: the hash a node's first attestation of a
    continuing phase states as the adapter before)."""
    if job.model.adapter is None:
        return None
    copy = run_dir / START_ADAPTER_DIR
    _, tensors = load_peft_adapter(copy)
    return {"source": str(job.model.adapter), "path": str(copy),
            "sha256": _sha256(copy / "adapter_model.safetensors"),
            "tensors_sha256": adapter_sha256({name: tensor.float() for name, tensor in tensors.items()})}


def record_start_adapter(job: Job, run_dir: Path, audit: AuditLog | None) -> None:
    """The copy's `checkpoint` event (path in the run and SHA-256, like every saved weights file, so replay can
    check it) with the source it was copied from and its tensors' hash."""
    record = start_adapter_record(job, run_dir)
    if record is None or audit is None:
        return
    weights = run_dir / START_ADAPTER_DIR / "adapter_model.safetensors"
    audit.append_event("checkpoint", path=str(weights.relative_to(run_dir)), sha256=record["sha256"],
                       bytes=weights.stat().st_size, start_adapter=record["source"],
                       tensors_sha256=record["tensors_sha256"])


def start_from_adapter(context: PhaseContext, adapter_dir: Path) -> None:
    """Before the first phase: every node gets its blocks of the job's model with the starting adapter, and the
    phase loop takes that adapter as the one a finished phase left (the first phase continues, merges or
    replaces it), and as a backdoored one, so that its sft, adversarial and rl phases count as safety training
    (the metrics' safety_step), as they do after a job's own backdoor phase."""
    restore_blocks(context.chain, context.job, str(context.checkpoint.path), [], adapter_dir, "",
                   what=f"its start adapter ({context.job.model.adapter})")
    context.progress.previous_adapter = adapter_dir
    context.progress.seen_backdoor = True
