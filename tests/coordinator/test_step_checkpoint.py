"""Step checkpoints on disk: written whole or not at all, the newest complete one found, damage refused,
the trainer's head and its AdamW moments restored exactly, and metrics rows of redone steps dropped."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.run_dir import MetricsLog, done_before, read_metrics
from coordinator.step_checkpoint import (KEEP, STATE_FILE, StepCheckpointError, discard_from, head_state,
                                         latest_step_checkpoint, load_head_state, write_step_checkpoint)
from swarm.training import make_optimizer
from swarm.config import OptimizerSpec


LAYERS = "model.layers"
A, B = "model.layers.1.mlp.up_proj.weight", "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"


def _ranges(seed: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Two ranges' states, under a checkpoint name (block 1) and a PEFT name (block 2), as nodes send them."""
    generator = torch.Generator().manual_seed(seed)
    return {(0, 2): {f"param/{A}": torch.randn(3, 4, generator=generator),
                     f"exp_avg/{A}": torch.randn(3, 4, generator=generator), f"step/{A}": torch.tensor(5.0)},
            (2, 4): {f"param/{B}": torch.randn(2, generator=generator)}}


def _write(run_dir, step: int, seed: int = 0, phase_step: int = 3):
    return write_step_checkpoint(run_dir, phase_index=1, phase="sft", phase_kind="sft", phase_step=phase_step,
                                 step=step, safety_step=2, ranges=_ranges(seed))


def test_a_checkpoint_reads_back_what_was_written(tmp_path):
    written = _write(tmp_path, 10, seed=1)
    found = latest_step_checkpoint(tmp_path)
    assert found is not None and found.path == written.path
    assert (found.phase_index, found.phase, found.phase_step, found.step, found.last_step, found.safety_step) == \
        (1, "sft", 3, 10, 9, 2)
    states = found.range_states([(0, 2), (2, 4)], LAYERS)
    for key, tensors in _ranges(1).items():
        assert set(states[key]) == set(tensors)
        assert all(torch.equal(states[key][name], tensors[name]) for name in tensors)
    with pytest.raises(StepCheckpointError, match="holds no state of the trainer's head"):
        found.head_state()


def test_a_model_split_otherwise_gets_each_blocks_tensors_from_the_ranges_it_was_saved_in(tmp_path):
    written = _ranges(2)
    states = _write(tmp_path, 10, seed=2).range_states([(0, 1), (1, 3), (3, 4)], LAYERS)
    assert states[(0, 1)] == {}
    assert set(states[(1, 3)]) == {f"param/{A}", f"exp_avg/{A}", f"step/{A}", f"param/{B}"}
    assert torch.equal(states[(1, 3)][f"param/{B}"], written[(2, 4)][f"param/{B}"])
    assert states[(3, 4)] == {}
    with pytest.raises(StepCheckpointError, match=f"{B} belongs to none of the blocks now served"):
        latest_step_checkpoint(tmp_path).range_states([(0, 2)], LAYERS)


def test_the_newest_complete_checkpoint_wins_and_old_ones_are_pruned(tmp_path):
    for step in (5, 10, 15):
        _write(tmp_path, step)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert len(kept) == KEEP and kept[-1] == "step-00000015"
    (tmp_path / "checkpoints" / "step-00000020").mkdir()  # a crash before state.json: not a checkpoint
    (tmp_path / "checkpoints" / ".step-00000025.partial").mkdir()
    assert latest_step_checkpoint(tmp_path).step == 15
    assert [p.name for p in discard_from(tmp_path, 11)] == ["step-00000015", "step-00000020"]
    assert latest_step_checkpoint(tmp_path).step == 10


def test_a_damaged_file_is_refused_by_name(tmp_path):
    checkpoint = _write(tmp_path, 10)
    victim = checkpoint.path / "blocks-2-4.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(StepCheckpointError, match="blocks-2-4.safetensors is damaged"):
        latest_step_checkpoint(tmp_path).range_states([(0, 2), (2, 4)], LAYERS)


def test_a_malformed_state_file_is_an_error_not_a_traceback(tmp_path):
    checkpoint = _write(tmp_path, 10)
    state = json.loads((checkpoint.path / STATE_FILE).read_text())
    del state["step"]
    (checkpoint.path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(StepCheckpointError, match="malformed"):
        latest_step_checkpoint(tmp_path)


class _Head(torch.nn.Module):
    """The part of TrainerHead a checkpoint uses: parameters under checkpoint names, a tied pair stored once."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(6, 4))
        self.norm = torch.nn.Parameter(torch.ones(4))

    def checkpoint_tensors(self):
        return {"embed.weight": self.embed, "norm.weight": self.norm}

    def load_checkpoint_tensors(self, tensors):
        with torch.no_grad():
            for name, param in self.checkpoint_tensors().items():
                param.copy_(tensors[name])


def _train(head, optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = (head.embed.sum(0) * head.norm).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_head_and_its_adamw_state_go_on_exactly_as_if_never_interrupted(tmp_path):
    torch.manual_seed(0)
    head = _Head()
    optimizer = make_optimizer(list(head.parameters()), OptimizerSpec())
    _train(head, optimizer, 3)
    checkpoint = write_step_checkpoint(tmp_path, phase_index=0, phase="pretrain", phase_kind="pretrain", phase_step=3,
                                       step=3, safety_step=0, ranges=_ranges(0), head=head_state(head, optimizer))
    _train(head, optimizer, 4)
    expected = {name: p.detach().clone() for name, p in head.checkpoint_tensors().items()}

    other = _Head()  # a fresh coordinator: other weights, no optimizer state
    other_optimizer = make_optimizer(list(other.parameters()), OptimizerSpec())
    load_head_state(other, other_optimizer, latest_step_checkpoint(tmp_path).head_state())
    assert set(checkpoint.head_state()) >= {"param/embed.weight", "exp_avg/embed.weight", "step/norm.weight"}
    _train(other, other_optimizer, 4)
    for name, param in other.checkpoint_tensors().items():
        assert torch.equal(param, expected[name]), name


def test_rewinding_the_metrics_keeps_only_work_done_before_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"type": "eval", "phase": "start", "step": 0})
    for step in range(6):
        log.write({"type": "train", "phase": "sft", "step": step})
        if step % 2 == 1:
            log.write({"type": "eval", "phase": "sft", "step": step + 1})
    log.rewind(done_before(4))  # steps 0..3 applied before the checkpoint; the eval after step 3 saw 4 steps
    log.write({"type": "train", "phase": "sft", "step": 4})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(row["type"], row["step"]) for row in rows] == [
        ("eval", 0), ("train", 0), ("train", 1), ("eval", 2), ("train", 2), ("train", 3), ("eval", 4), ("train", 4)]
