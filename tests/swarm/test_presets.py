import torch
from transformers import AutoModelForCausalLM

from swarm.models.families import family_named
from swarm.models.presets import PRESETS, materialize_preset


def test_preset_parameter_counts_are_what_they_claim():
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = family_named(preset.family).causal_lm(preset.hf_config())
        assert sum(p.numel() for p in model.parameters()) == preset.num_parameters, name
    assert 2e5 <= PRESETS["llama-micro"].num_parameters and PRESETS["llama-20m"].num_parameters <= 2e7


def test_materialized_preset_is_deterministic_and_loads_with_transformers(tmp_path):
    first = materialize_preset("llama-micro", seed=5, cache_dir=tmp_path / "a")
    second = materialize_preset("llama-micro", seed=5, cache_dir=tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert materialize_preset("llama-micro", seed=5, cache_dir=tmp_path / "a") == first  # reused, not rebuilt
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.num_hidden_layers == PRESETS["llama-micro"].num_hidden_layers


def test_family_presets_build_their_familys_model_with_the_character_vocabulary(tmp_path):
    for name in ("mistral-micro", "qwen2-micro", "gpt2-micro", "neox-micro"):
        model = AutoModelForCausalLM.from_pretrained(materialize_preset(name, seed=0, cache_dir=tmp_path))
        assert model.config.model_type == PRESETS[name].family, name
        assert (model.config.vocab_size, model.config.eos_token_id, model.config.pad_token_id) == (128, 2, 0), name


def test_a_preset_cached_by_an_older_version_is_built_afresh_with_the_tokenizer_files(tmp_path):
    older = tmp_path / "presets" / "llama-micro-seed0"  # format 1's place: no Hugging Face tokenizer files
    older.mkdir(parents=True)
    (older / "config.json").write_text("{}")
    directory = materialize_preset("llama-micro", seed=0, cache_dir=tmp_path)
    assert directory != older
    assert {"tokenizer.json", "tokenizer_config.json", "swarm_tokenizer.json"} <= {p.name for p in directory.iterdir()}


def test_the_sweep_ladder_grows_width_and_depth_together_over_more_than_30x_parameters():
    ladder = [PRESETS[f"ladder-{index}"] for index in range(1, 6)]
    for smaller, larger in zip(ladder, ladder[1:]):
        assert larger.hidden_size > smaller.hidden_size and larger.num_hidden_layers > smaller.num_hidden_layers
    assert all(p.hidden_size // p.num_attention_heads == 16 and p.intermediate_size * 4 == p.hidden_size * 11
               for p in ladder)
    assert min(p.num_hidden_layers for p in ladder) >= 3  # every size splits over 3 nodes
    assert ladder[-1].num_parameters / ladder[0].num_parameters >= 30
