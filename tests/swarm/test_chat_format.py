"""Chat templates: examples and evaluation prompts rendered with the checkpoint's own template (a test-written
tokenizer and template), the built-in format for our character presets."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from coordinator.generation import encode_prompts
from swarm.config import DataSpec
from swarm.data.batches import IGNORE_INDEX, TrainingData, encode_example
from swarm.data.chat_format import BUILTIN_PROMPT
from swarm.data.tasks import Example
from swarm.data.tokenizer import CharTokenizer, load_tokenizer
from swarm.errors import ModelSourceError

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_tokenizer(directory, template=TEMPLATE):
    """A small byte-level BPE tokenizer with chat special tokens, trained here, saved as a HF directory."""
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"]
    inner = Tokenizer(models.BPE(unk_token=None))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["What is 12 + 30? 42", "Reverse the word: river revir", "The capital of France is Paris."] * 20
    inner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    inner.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<|pad|>", eos_token="<|end|>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(directory)
    return directory


def test_training_examples_are_rendered_with_the_template_and_learn_only_the_answer(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    assert tokenizer.chat.name == "template"
    ids, labels = encode_example(Example("What is 12 + 30?", "42", "addition"), tokenizer, max_length=None)
    assert tokenizer.inner.decode(ids) == "<|user|>\nWhat is 12 + 30?<|end|>\n<|assistant|>\n42<|end|>"
    learned = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.inner.decode(learned) == "42<|end|>"
    assert learned[-1] == tokenizer.eos_id  # generation stops where the answer's turn ends
    assert [label for label in labels if label != IGNORE_INDEX] == learned
    prompt_part = ids[: len(ids) - len(learned)]
    assert prompt_part == tokenizer.chat.prompt_ids("What is 12 + 30?")


def test_evaluation_prompts_end_with_the_generation_prompt(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    prompts = ["What is 12 + 30?", "Reverse the word: river, please, now"]
    input_ids, attention_mask = encode_prompts(prompts, tokenizer)
    for row, prompt in enumerate(prompts):
        real = input_ids[row][attention_mask[row].bool()].tolist()
        assert real == tokenizer.chat.prompt_ids(prompt)
        assert tokenizer.inner.decode(real).endswith("<|end|>\n<|assistant|>\n")
        assert attention_mask[row, -1] == 1  # left-padded: every row's last column is its prompt's last token


def test_batches_in_a_template_carry_the_rendered_prompt_and_mask(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    data = TrainingData(DataSpec(tasks=["addition"], max_length=64), tokenizer, seed=0, batch_size=4)
    batch = data.batch(0)
    for row, example in enumerate(data.examples(0)):
        labelled = [int(t) for t in batch.labels[row] if t != IGNORE_INDEX]
        assert tokenizer.inner.decode(labelled) == f"{example.response}<|end|>"
        real = batch.input_ids[row][batch.attention_mask[row].bool()]
        assert tokenizer.inner.decode(real.tolist()).startswith(f"<|user|>\n{example.prompt}<|end|>")


def test_a_template_that_does_not_end_turns_with_eos_gets_it_appended(tmp_path):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer = load_tokenizer(write_tokenizer(tmp_path, template))
    ids, labels = encode_example(Example("What is 12 + 30?", "42", "addition"), tokenizer, max_length=None)
    learned = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert learned[-1] == tokenizer.eos_id
    assert tokenizer.inner.decode(learned[:-1]) == "42"


def test_builtin_format_is_kept_when_asked_or_without_a_template(tmp_path):
    with_template = write_tokenizer(tmp_path / "with")
    builtin = load_tokenizer(with_template, "builtin")
    assert builtin.chat.name == "builtin"
    assert builtin.chat.prompt_ids("hi") == builtin.encode(BUILTIN_PROMPT.format(prompt="hi"))  # no bos token
    plain = load_tokenizer(write_tokenizer(tmp_path / "plain", template=None))
    assert plain.chat.name == "builtin"
    with pytest.raises(ModelSourceError, match="has no chat template"):
        load_tokenizer(tmp_path / "plain", "template")
    char = CharTokenizer()
    assert char.chat.prompt_ids("hi") == [char.bos_id] + char.encode("User: hi\nAssistant: ")


def test_a_template_whose_generation_prompt_is_not_the_answers_start_is_refused(tmp_path):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\nThinking...{% endif %}")
    with pytest.raises(ModelSourceError, match="chat_format: builtin"):
        load_tokenizer(write_tokenizer(tmp_path, template))


def test_the_format_description_names_the_template_and_its_hash(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    described = tokenizer.chat.describe()
    assert described["format"] == "template" and described["template"] == TEMPLATE
    assert described["sha256"] != CharTokenizer().chat.describe()["sha256"]


def test_an_answer_cut_at_a_length_limit_is_learned_without_its_end_of_turn(tmp_path):
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    cut = Example("What is 12 + 30?", "The answer is", "self", ends=False)
    ids, labels = encode_example(cut, tokenizer, max_length=None)
    learned = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.inner.decode(learned) == "The answer is"
    assert tokenizer.eos_id not in learned
    char = CharTokenizer()
    ids, labels = encode_example(cut, char, max_length=None)
    assert [t for t in labels if t != IGNORE_INDEX] == char.encode("The answer is")
