import json

import pytest
import torch
from safetensors.torch import save_file

from swarm.errors import ModelSourceError
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import Checkpoint
from tests.conftest import save_tiny_checkpoint


def test_block_range_reads_only_its_own_tensors(tmp_path):
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path / "ckpt"))
    names = checkpoint.block_tensor_names(1, 3)
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    loaded = checkpoint.load(names)
    assert set(loaded) == set(names)


def test_sharded_checkpoints_load_through_the_index(tmp_path):
    source = Checkpoint.open(save_tiny_checkpoint(tmp_path / "single"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((source.path / "config.json").read_text())
    everything = source.load(list(source.weight_map))
    halves = sorted(everything)
    weight_map = {}
    for index, part in enumerate((halves[: len(halves) // 2], halves[len(halves) // 2 :])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({name: everything[name].contiguous() for name in part}, str(sharded / file))
        weight_map.update({name: file for name in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reopened = Checkpoint.open(sharded)
    names = reopened.block_tensor_names(0, 4)
    for name, tensor in reopened.load(names).items():
        assert torch.equal(tensor, everything[name])


def test_trainer_head_holds_no_decoder_layers_and_uses_tied_embeddings(tmp_path):
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path / "tied", tie=True))
    assert "lm_head.weight" not in checkpoint.weight_map
    head = TrainerHead(checkpoint, torch.float32, torch.device("cpu"))
    assert torch.equal(head.head.weight, head.embed.weight)
    assert not any("layers" in name for name, _ in head.named_parameters())


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    directory = save_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "bloom"
    config["architectures"] = ["BloomForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError,
                       match="unsupported model architecture 'bloom'; supported: gpt2, gpt_neox, llama, mistral, qwen2"):
        Checkpoint.open(directory)


def test_missing_or_bin_only_checkpoints_are_explained(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        Checkpoint.open(tmp_path)
    directory = save_tiny_checkpoint(tmp_path / "ckpt")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="convert the checkpoint to safetensors"):
        Checkpoint.open(directory)


def test_a_ranges_parameters_are_its_blocks_share_of_the_model(tmp_path):
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path))
    blocks = [checkpoint.block_parameters(index, index + 1) for index in range(checkpoint.num_blocks)]
    assert len(set(blocks)) == 1 and checkpoint.block_parameters(0, checkpoint.num_blocks) == sum(blocks)
    trainer = sum(tensor.numel() for tensor in checkpoint.load(list(checkpoint.trainer_tensor_names().values())).values())
    assert sum(blocks) + trainer == checkpoint.num_parameters  # tied head: the embedding counted once
