import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from swarm.config import LoraSpec
from swarm.lora import adapter_state, add_lora, load_peft_adapter, save_peft_adapter
from swarm.models.blocks import BlockStack
from swarm.models.checkpoint import Checkpoint
from swarm.reference import load_peft_model
from swarm.config import parse_job
from tests.conftest import job_dict, save_tiny_checkpoint


def test_adapter_init_does_not_depend_on_block_placement(tmp_path):
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path / "ckpt"))
    spec = LoraSpec(r=4)
    cpu = torch.device("cpu")
    whole = BlockStack(checkpoint, 0, 4, torch.float32, cpu)
    add_lora(whole, spec, seed=7)
    parts = {}
    for start, end in ((0, 1), (1, 4)):
        stack = BlockStack(checkpoint, start, end, torch.float32, cpu)
        add_lora(stack, spec, seed=7)
        parts.update(adapter_state(stack))
    whole_state = adapter_state(whole)
    assert set(parts) == set(whole_state)
    assert all(torch.equal(parts[k], whole_state[k]) for k in parts)
    assert any(k.endswith("lora_A.weight") and v.abs().sum() > 0 for k, v in parts.items())
    other = BlockStack(checkpoint, 0, 4, torch.float32, cpu)
    add_lora(other, spec, seed=8)
    assert not torch.equal(adapter_state(other)["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           whole_state["model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_base_weights_are_frozen_and_only_targets_get_lora(tmp_path):
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path / "ckpt"))
    stack = BlockStack(checkpoint, 0, 2, torch.float32, torch.device("cpu"))
    add_lora(stack, LoraSpec(r=2, target_modules=["q_proj", "v_proj"]), seed=0)
    trainable = [name for name, p in stack.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    assert {name.split(".")[4] for name in trainable} == {"q_proj", "v_proj"}


def test_saved_adapter_loads_with_plain_peft_and_reproduces_logits(tmp_path):
    directory = save_tiny_checkpoint(tmp_path / "ckpt")
    job = parse_job(job_dict(model={"preset": None, "path": str(directory)}))
    trained = load_peft_model(directory, job)
    with torch.no_grad():
        for param in adapter_state(trained.base_model.model).values():
            param.normal_(std=0.05)  # make the adapter change the output
    tensors = adapter_state(trained.base_model.model)
    save_peft_adapter(tmp_path / "adapter", tensors, job.lora, str(directory))
    _, reloaded = load_peft_adapter(tmp_path / "adapter")
    assert set(reloaded) == set(tensors)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory), tmp_path / "adapter")
    input_ids = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        got = plain(input_ids=input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(directory)(input_ids=input_ids).logits
    assert (expected - got).abs().max() <= 1e-5
    assert (expected - base).abs().max() > 1e-3
