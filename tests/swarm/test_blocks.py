"""A chain of BlockStacks plus the TrainerHead computes exactly what the whole model computes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.models.blocks import BlockStack, TrainerHead
from swarm.models.checkpoint import Checkpoint
from swarm.training import position_ids_for
from tests.conftest import save_tiny_checkpoint


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_block_chain_matches_the_whole_model(tmp_path, family):
    directory = save_tiny_checkpoint(tmp_path / family, family=family)
    checkpoint = Checkpoint.open(directory)
    cpu = torch.device("cpu")
    stacks = [BlockStack(checkpoint, start, end, torch.float32, cpu) for start, end in ((0, 1), (1, 3), (3, 4))]
    head = TrainerHead(checkpoint, torch.float32, cpu)
    torch.manual_seed(1)
    input_ids = torch.randint(4, 100, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0  # right padding
    positions = position_ids_for(attention_mask)
    hidden = head.embed_tokens(input_ids)
    with torch.no_grad():
        for stack in stacks:
            hidden = stack(hidden, attention_mask, positions)
        swarm_logits = head.logits(hidden)
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
        whole_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (swarm_logits - whole_logits)[real].abs().max().item() <= 1e-5


def test_stack_builds_only_its_layers(tmp_path):
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path / "ckpt"))
    stack = BlockStack(checkpoint, 2, 4, torch.float32, torch.device("cpu"))
    layers = {name.split(".")[2] for name, _ in stack.named_parameters()}
    assert layers == {"2", "3"}
    assert not any(p.is_meta for p in stack.parameters())
