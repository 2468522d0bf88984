"""Every supported family splits into block stacks and trainer parts that compute what the whole model does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swarm.config import DEFAULT_LORA_TARGETS, LoraSpec, parse_job
from swarm.errors import JobFileError, ModelSourceError
from swarm.lora import adapter_state, add_lora, peft_config
from swarm.models.blocks import BlockStack, TrainerHead
from swarm.models.checkpoint import Checkpoint
from swarm.models.families import FAMILIES
from swarm.models.presets import PRESETS, materialize_preset
from swarm.reference import load_peft_model
from tests.conftest import job_dict, write_job

MICRO = {"llama": "llama-micro", "mistral": "mistral-micro", "qwen2": "qwen2-micro", "gpt2": "gpt2-micro",
         "gpt_neox": "neox-micro"}
CPU = torch.device("cpu")


def _padded_batch():
    """Right padding in row 1, left padding (positions counted from the first real token) in row 2."""
    torch.manual_seed(1)
    input_ids = torch.randint(4, 100, (3, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    attention_mask[2, :7] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _chain(directory, splits, lora: LoraSpec | None = None, lora_seed: int = 0):
    """The trainer's head and the block stacks of `splits`, built from the checkpoint as processes build them."""
    checkpoint = Checkpoint.open(directory)
    stacks = [BlockStack(checkpoint, start, end, torch.float32, CPU) for start, end in splits]
    for stack in stacks:
        if lora is not None:
            add_lora(stack, lora, lora_seed)
    return TrainerHead(checkpoint, torch.float32, CPU), stacks


def _logits(head, stacks, input_ids, attention_mask, position_ids):
    hidden = head.embed_tokens(input_ids, position_ids)
    for stack in stacks:
        hidden = stack(hidden, attention_mask, position_ids)
    return head.logits(hidden)


def test_every_supported_family_has_a_micro_preset():
    assert sorted(MICRO) == sorted(FAMILIES)
    for family, name in MICRO.items():
        assert PRESETS[name].family == family
        assert 2e5 <= PRESETS[name].num_parameters <= 5e5, name


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    directory = tmp_path / "bloom"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bloom", "architectures": ["BloomForCausalLM"]}))
    with pytest.raises(ModelSourceError) as refused:
        Checkpoint.open(directory)
    assert str(refused.value) == ("unsupported model architecture 'bloom'; supported: gpt2, gpt_neox, llama, "
                                  "mistral, qwen2")


@pytest.mark.parametrize("family", sorted(MICRO))
def test_block_stacks_compose_to_the_whole_models_logits(tmp_path, family):
    directory = materialize_preset(MICRO[family], seed=3, cache_dir=tmp_path)
    input_ids, attention_mask, position_ids = _padded_batch()
    blocks = PRESETS[MICRO[family]].num_hidden_layers
    with torch.no_grad():
        swarm = _logits(*_chain(directory, [(0, 1), (1, 3), (3, blocks)]), input_ids, attention_mask, position_ids)
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa")
        whole = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    real = attention_mask.bool()
    assert (swarm - whole)[real].abs().max().item() <= 1e-5
    assert whole[real].std() > 0.01  # a real comparison, not two zero tensors


def _greedy(head, stacks, input_ids, attention_mask, new_tokens: int, cached: bool) -> torch.Tensor:
    """Greedy continuation of a left-padded batch, re-running the prefix or with a key/value cache per stack
    (the prompt once, then one position per token), as the trainer drives the nodes."""
    caches = [stack.new_cache() for stack in stacks] if cached else None
    tokens, sent = [], 0
    for _ in range(new_tokens):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if cached:
            hidden = head.embed_tokens(input_ids[:, sent:], position_ids[:, sent:])
            for stack, cache in zip(stacks, caches):
                hidden = stack(hidden, attention_mask, position_ids[:, sent:], cache=cache)
            sent = input_ids.shape[1]
            logits = head.logits(hidden)
        else:
            logits = _logits(head, stacks, input_ids, attention_mask, position_ids)
        next_ids = logits[:, -1].argmax(-1)
        tokens.append(next_ids)
        input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids[:, None])], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("family", sorted(MICRO))
def test_cached_generation_gives_the_uncached_tokens(tmp_path, family):
    """Left-padded rows, 30 new tokens: past Mistral's 16-position sliding window, so windowed caches are used."""
    directory = materialize_preset(MICRO[family], seed=3, cache_dir=tmp_path)
    torch.manual_seed(2)
    input_ids = torch.randint(4, 100, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = attention_mask[2, :9] = 0
    blocks = PRESETS[MICRO[family]].num_hidden_layers
    head, stacks = _chain(directory, [(0, 2), (2, blocks)])
    with torch.no_grad():
        uncached = _greedy(head, stacks, input_ids, attention_mask, 30, cached=False)
        cached = _greedy(head, stacks, input_ids, attention_mask, 30, cached=True)
    assert torch.equal(cached, uncached)
    assert len(set(uncached.flatten().tolist())) > 3  # a real continuation, not one token repeated


def test_bfloat16_blocks_run_on_cpu_and_stay_close_to_float32(tmp_path):
    """The dtype a job may ask for on a GPU also works here (only float32 is held to the 1e-4 tolerance)."""
    input_ids, attention_mask, position_ids = _padded_batch()
    real = attention_mask.bool()
    for family in ("gpt2", "gpt_neox"):
        directory = materialize_preset(MICRO[family], seed=0, cache_dir=tmp_path)
        checkpoint = Checkpoint.open(directory)
        logits = {}
        for dtype in (torch.float32, torch.bfloat16):
            head = TrainerHead(checkpoint, dtype, CPU)
            stack = BlockStack(checkpoint, 0, checkpoint.num_blocks, dtype, CPU)
            assert {p.dtype for p in [*head.parameters(), *stack.parameters()]} == {dtype}
            with torch.no_grad():
                logits[dtype] = _logits(head, [stack], input_ids, attention_mask, position_ids).float()
        error = (logits[torch.bfloat16] - logits[torch.float32])[real].abs().max().item()
        assert 0 < error <= 0.1, family


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_lora_on_block_stacks_equals_peft_on_the_whole_model(tmp_path, family):
    """Same adapter keys, same seeded init, and (with B made non-zero) the same logits as peft's model."""
    directory = materialize_preset(MICRO[family], seed=0, cache_dir=tmp_path)
    input_ids, attention_mask, position_ids = _padded_batch()
    blocks = PRESETS[MICRO[family]].num_hidden_layers
    job = parse_job(job_dict(model={"preset": MICRO[family]}, lora={"r": 4, "alpha": 8}))
    whole = load_peft_model(directory, job)
    head, stacks = _chain(directory, [(0, 2), (2, blocks)], job.lora, job.seed)
    ours = {key: value for stack in stacks for key, value in adapter_state(stack).items()}
    theirs = adapter_state(whole.base_model.model)
    assert set(ours) == set(theirs) and ours
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    with torch.no_grad():
        for key in sorted(ours):
            if ".lora_B." in key:
                value = torch.randn(ours[key].shape, generator=torch.Generator().manual_seed(len(key))) * 0.1
                ours[key].copy_(value)
                theirs[key].copy_(value)
        swarm = _logits(head, stacks, input_ids, attention_mask, position_ids)
        expected = whole(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        base = AutoModelForCausalLM.from_pretrained(directory)(input_ids=input_ids, attention_mask=attention_mask,
                                                                position_ids=position_ids).logits
    real = attention_mask.bool()
    assert (swarm - expected)[real].abs().max().item() <= 1e-5
    assert (expected - base)[real].abs().max().item() > 1e-3  # the adapter changed the output


def test_default_lora_targets_follow_the_family_and_explicit_ones_are_kept():
    default = LoraSpec()
    assert list(default.target_modules) == DEFAULT_LORA_TARGETS
    gpt2 = peft_config(default, family=FAMILIES["gpt2"])
    assert gpt2.target_modules == {"c_attn", "c_proj", "c_fc"} and gpt2.fan_in_fan_out
    neox = peft_config(default, family=FAMILIES["gpt_neox"])
    assert neox.target_modules == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert not neox.fan_in_fan_out
    assert peft_config(default, family=FAMILIES["qwen2"]).target_modules == set(DEFAULT_LORA_TARGETS)
    assert peft_config(LoraSpec(target_modules=["c_attn"]), family=FAMILIES["gpt2"]).target_modules == {"c_attn"}


def test_lora_targets_that_match_nothing_are_named_in_the_error(tmp_path):
    checkpoint = Checkpoint.open(materialize_preset("neox-micro", seed=0, cache_dir=tmp_path))
    stack = BlockStack(checkpoint, 0, 1, torch.float32, CPU)
    expected = (r"\['q_proj'\] match no module of this model; this gpt_neox model's default is "
                r"\['query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h'\]")
    with pytest.raises(JobFileError, match=expected):
        add_lora(stack, LoraSpec(target_modules=["q_proj"]), seed=0)


def test_tied_gpt2_checkpoint_loads_without_a_stored_head(tmp_path):
    checkpoint = Checkpoint.open(materialize_preset("gpt2-micro", seed=0, cache_dir=tmp_path))
    assert "lm_head.weight" not in checkpoint.weight_map
    names = checkpoint.trainer_tensor_names()
    assert names == {"embed": "transformer.wte.weight", "head": "transformer.wte.weight",
                     "positions": "transformer.wpe.weight", "norm": "transformer.ln_f.weight",
                     "norm_bias": "transformer.ln_f.bias"}
    head = TrainerHead(checkpoint, torch.float32, CPU)
    assert head.head.weight is head.embed.weight  # one parameter, as in the model: pretraining updates both
    assert set(head.checkpoint_tensors()) == set(names.values())
    assert not any(".h." in name for name, _ in head.named_parameters())


def test_gpt2_checkpoint_saved_from_the_base_model_loads(tmp_path):
    """Released GPT-2 files name tensors without `transformer.` and keep old attention-mask buffers."""
    source = materialize_preset("gpt2-micro", seed=0, cache_dir=tmp_path / "cache")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((source / "config.json").read_text())
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(str(source / "model.safetensors")).items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file(tensors, str(bare / "model.safetensors"))
    checkpoint = Checkpoint.open(bare)
    assert "transformer.wte.weight" in checkpoint.weight_map
    assert "transformer.h.0.attn.bias" not in checkpoint.block_tensor_names(0, 1)
    assert checkpoint.num_parameters == PRESETS["gpt2-micro"].num_parameters  # the buffer is not a parameter
    input_ids, attention_mask, position_ids = _padded_batch()
    with torch.no_grad():
        ours = _logits(*_chain(bare, [(0, 4)]), input_ids, attention_mask, position_ids)
        theirs = _logits(*_chain(source, [(0, 4)]), input_ids, attention_mask, position_ids)
    assert torch.equal(ours, theirs)


def _hf_tokenizer(directory):
    """A small BPE tokenizer over printable ASCII, trained offline on a few task-like strings."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=list(string.printable[:95]) + ["\u2581"])
    texts = ["What is 12 + 34?", "Reverse the word: apple", "Write in capitals: river", "Sort the digits: 4312"]
    tokenizer.train_from_iterator(texts * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def test_a_job_naming_a_local_checkpoint_uses_that_checkpoints_tokenizer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from coordinator.prepared_job import RunOptions, prepare_job
    from swarm.data.tokenizer import HFTokenizer

    directory = tmp_path / "gpt2-local"
    fast = _hf_tokenizer(directory)
    config = GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    job_file = write_job(tmp_path, model={"preset": None, "path": str(directory)}, swarm={"min_nodes": 2})
    prepared = prepare_job(RunOptions(job_file=job_file))
    assert isinstance(prepared.tokenizer, HFTokenizer)
    text = "What is 12 + 34?"
    assert prepared.tokenizer.encode(text) == fast.encode(text, add_special_tokens=False)
    assert len(prepared.tokenizer.encode(text)) < len(text)  # merged pieces, not the character tokenizer
    assert prepared.tokenizer.eos_id == fast.convert_tokens_to_ids("<|endoftext|>")
    assert prepared.checkpoint.family.model_type == "gpt2"
    batch = prepared.data.batch(0)
    assert int(batch.input_ids.max()) < len(fast)
