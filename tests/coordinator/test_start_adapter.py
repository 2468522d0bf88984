"""What a run may start from (model.adapter): refused in one line naming the adapter unless it fits the job."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.start_adapter import StartAdapterError, check_start_adapter, install_start_adapter
from swarm.config import parse_job
from swarm.lora import adapter_state, lora_block_stack, save_peft_adapter
from swarm.models.checkpoint import Checkpoint, resolve_model
from tests.conftest import job_dict


def _job(adapter, **sections):
    data = job_dict(**sections)
    data["model"] = {**data["model"], "adapter": str(adapter)}
    return parse_job(data)


def _saved_adapter(directory, preset="llama-micro", lora=None):
    """An adapter as a finished LoRA phase saves it, of `preset` with the job's (or `lora`'s) LoRA settings."""
    job = parse_job(job_dict(model={"preset": preset}, **({"lora": lora} if lora else {})))
    checkpoint = Checkpoint.open(resolve_model(job.model))
    stack = lora_block_stack(checkpoint, 0, checkpoint.num_blocks, job.lora, job.seed, torch.float32)
    save_peft_adapter(directory, {k: v.detach() for k, v in adapter_state(stack).items()}, job.lora, str(checkpoint.path))
    return directory, checkpoint


def test_an_adapter_of_this_model_and_lora_is_accepted(tmp_path):
    adapter, checkpoint = _saved_adapter(tmp_path / "adapter")
    check_start_adapter(_job(adapter), checkpoint)


def test_a_directory_without_an_adapter_is_refused_naming_it(tmp_path):
    job = _job(tmp_path / "nothing-here")
    with pytest.raises(StartAdapterError, match=r"model.adapter .*nothing-here: not a LoRA adapter directory"):
        check_start_adapter(job, Checkpoint.open(resolve_model(job.model)))


def test_an_adapter_of_another_rank_is_refused_naming_both(tmp_path):
    adapter, checkpoint = _saved_adapter(tmp_path / "adapter", lora={"r": 8, "alpha": 8})
    with pytest.raises(StartAdapterError, match=r"has LoRA r=8, alpha=8.*this job's lora is r=4, alpha=8"):
        check_start_adapter(_job(adapter), checkpoint)


def test_an_adapter_of_another_model_is_refused(tmp_path):
    adapter, _ = _saved_adapter(tmp_path / "adapter", preset="ladder-1")
    job = _job(adapter)  # llama-micro: other widths and depth
    with pytest.raises(StartAdapterError, match=r"does not fit model .*it was trained on another model"):
        check_start_adapter(job, Checkpoint.open(resolve_model(job.model)))


def test_an_adapter_trained_on_other_weights_of_the_same_shape_is_refused(tmp_path):
    adapter, _ = _saved_adapter(tmp_path / "adapter")  # on llama-micro seed 0
    job = _job(adapter, model={"preset": "llama-micro", "seed": 1})
    with pytest.raises(StartAdapterError, match=r"was trained on .*whose weights differ"):
        check_start_adapter(job, Checkpoint.open(resolve_model(job.model)))


def test_an_adapter_trained_on_top_of_merged_adapters_is_refused(tmp_path):
    adapter, checkpoint = _saved_adapter(tmp_path / "phases" / "02-sft" / "adapter")
    (adapter.parent / "lineage.json").write_text(json.dumps({
        "base_model": str(checkpoint.path), "merged_adapters_in_order": [str(tmp_path / "phases" / "01-sft" / "adapter")],
        "adapter": str(adapter)}))
    with pytest.raises(StartAdapterError, match=r"trained on top of 1 merged adapter"):
        check_start_adapter(_job(adapter), checkpoint)


def test_a_job_that_pretrains_cannot_start_from_an_adapter(tmp_path):
    adapter, checkpoint = _saved_adapter(tmp_path / "adapter")
    job = _job(adapter, training={"steps": None, "batch_size": 4, "micro_batches": 2},
               phases=[{"kind": "pretrain", "steps": 1}, {"kind": "sft", "steps": 1}])
    with pytest.raises(StartAdapterError, match="pretrain"):
        check_start_adapter(job, checkpoint)


def test_the_run_keeps_its_own_copy_of_the_start_adapter(tmp_path):
    adapter, _ = _saved_adapter(tmp_path / "adapter")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    copy = install_start_adapter(_job(adapter), run_dir)
    assert copy == run_dir / "start_adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (copy / name).read_bytes() == (adapter / name).read_bytes()
