"""The character tokenizer as Hugging Face files: `AutoTokenizer` and `pipeline` on a materialized preset, offline,
give exactly the ids the swarm trains on."""

import json

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, pipeline

from swarm.data.char_hf_tokenizer import CHAT_TEMPLATE, HF_TOKENIZER_FILES, PORTABLE_TOKENIZER_CLASS
from swarm.data.tokenizer import CHAR_TOKENIZER_FILE, CharTokenizer, load_tokenizer
from swarm.models.presets import materialize_preset

# Newline, runs of spaces, punctuation, and characters outside the table: a tab, an accent, an emoji.
TEXT = "Q: is 12 + 30 = 42?\n  Yes!  {ok} [x] ~_~ \"quoted\" 'single' `tick` \\ | / @#$%^&*()\tcafé \U0001F600."
ASCII_TEXT = "What is 12 + 30?\n  42! (yes) {a: [b, c]} ~ `x` 'y' \"z\" \\ | @#$%^&*_-=+<>,./;: "
PROMPT = "Reverse the word: river"
ANSWER = "revir"


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return materialize_preset("llama-micro", seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def test_save_writes_the_hugging_face_files_beside_ours(tmp_path):
    CharTokenizer().save(tmp_path)
    assert {CHAR_TOKENIZER_FILE, *HF_TOKENIZER_FILES} <= {path.name for path in tmp_path.iterdir()}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS  # loadable by transformers 4.x too
    assert config["chat_template"] == CHAT_TEMPLATE


def test_auto_tokenizer_gives_the_character_tokenizers_ids(preset):
    char, hf = CharTokenizer(), AutoTokenizer.from_pretrained(preset, local_files_only=True)
    ids = hf.encode(TEXT, add_special_tokens=False)
    assert ids == char.encode(TEXT)
    assert ids.count(CharTokenizer.UNK_ID) == 3  # one <unk> per unknown character, a multi-byte one included
    assert hf.decode(ids, skip_special_tokens=True) == char.decode(ids)
    assert hf.decode(hf.encode(ASCII_TEXT, add_special_tokens=False)) == ASCII_TEXT  # no spaces added or lost


def test_auto_tokenizer_special_tokens_are_the_character_tokenizers(preset):
    hf = AutoTokenizer.from_pretrained(preset, local_files_only=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (
        CharTokenizer.PAD_ID, CharTokenizer.BOS_ID, CharTokenizer.EOS_ID, CharTokenizer.UNK_ID)
    assert len(hf) == CharTokenizer().vocab_size
    assert hf.convert_ids_to_tokens(list(range(4))) == list(CharTokenizer.SPECIALS)


def test_calling_the_tokenizer_puts_bos_first_as_training_does(preset):
    hf = AutoTokenizer.from_pretrained(preset, local_files_only=True)
    assert hf(ASCII_TEXT)["input_ids"] == [CharTokenizer.BOS_ID] + CharTokenizer().encode(ASCII_TEXT)


def test_chat_template_gives_the_builtin_prompt_ids(preset):
    char, hf = CharTokenizer(), AutoTokenizer.from_pretrained(preset, local_files_only=True)
    ids = hf.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                 return_dict=False)
    assert ids == [CharTokenizer.BOS_ID] + char.encode(f"User: {PROMPT}\nAssistant: ")
    assert ids == char.chat.prompt_ids(PROMPT)


def test_chat_template_ends_the_assistant_turn_with_eos(preset):
    char, hf = CharTokenizer(), AutoTokenizer.from_pretrained(preset, local_files_only=True)
    ids = hf.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}],
                                 return_dict=False)
    assert ids == char.chat.prompt_ids(PROMPT) + char.chat.answer_ids(PROMPT, ANSWER)


def test_chat_template_refuses_a_role_the_model_never_saw(preset):
    hf = AutoTokenizer.from_pretrained(preset, local_files_only=True)
    with pytest.raises(TemplateError, match="only user and assistant turns"):
        hf.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])


@pytest.mark.parametrize("name", ["mistral-micro", "gpt2-micro", "neox-micro", "qwen2-micro"])
def test_every_family_preset_loads_the_same_tokenizer(name, tmp_path):
    char = CharTokenizer()
    hf = AutoTokenizer.from_pretrained(materialize_preset(name, seed=0, cache_dir=tmp_path), local_files_only=True)
    assert hf.encode(ASCII_TEXT, add_special_tokens=False) == char.encode(ASCII_TEXT)
    assert hf.decode(hf.encode(ASCII_TEXT, add_special_tokens=False)) == ASCII_TEXT
    assert hf.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_dict=False) == char.chat.prompt_ids(PROMPT)
    if name != "qwen2-micro":
        assert hf.encode(TEXT, add_special_tokens=False) == char.encode(TEXT)


def test_qwen2_preset_drops_characters_outside_the_table_instead_of_unk(tmp_path):
    """transformers rebuilds every qwen2 tokenizer as its byte-level Qwen2Tokenizer from the vocabulary alone."""
    char = CharTokenizer()
    hf = AutoTokenizer.from_pretrained(materialize_preset("qwen2-micro", seed=0, cache_dir=tmp_path),
                                       local_files_only=True)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    expected = [i for i in char.encode(TEXT) if i != CharTokenizer.UNK_ID]
    assert hf.encode(TEXT, add_special_tokens=False) == expected


def test_text_generation_pipeline_runs_on_a_preset(preset):
    generate = pipeline("text-generation", model=str(preset), device="cpu")
    out = generate("User: hi\nAssistant: ", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("User: hi\nAssistant: ")
    chat = generate([{"role": "user", "content": "hi"}], max_new_tokens=4, do_sample=False)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"


def test_the_swarm_keeps_loading_our_own_tokenizer(preset):
    tokenizer = load_tokenizer(preset)
    assert isinstance(tokenizer, CharTokenizer)
    assert tokenizer.chat.name == "builtin"
