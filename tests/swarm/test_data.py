import random

import pytest

from swarm.config import DataSpec
from swarm.data.batches import IGNORE_INDEX, TrainingData, read_jsonl
from swarm.data.tasks import TASKS, is_held_out, sample_examples
from swarm.data.tokenizer import CharTokenizer
from swarm.errors import JobFileError


def test_batches_are_a_function_of_seed_and_step():
    data = TrainingData(DataSpec(), CharTokenizer(), seed=3, batch_size=6)
    assert data.examples(5) == TrainingData(DataSpec(), CharTokenizer(), seed=3, batch_size=6).examples(5)
    assert data.examples(5) != data.examples(6)


def test_loss_covers_exactly_the_response_and_eos():
    tokenizer = CharTokenizer()
    batch = TrainingData(DataSpec(tasks=["addition"]), tokenizer, seed=0, batch_size=4).batch(0)
    examples = TrainingData(DataSpec(tasks=["addition"]), tokenizer, seed=0, batch_size=4).examples(0)
    for row, example in enumerate(examples):
        labelled = [int(t) for t in batch.labels[row] if t != IGNORE_INDEX]
        assert labelled == tokenizer.encode(example.response) + [tokenizer.eos_id]
        assert int(batch.attention_mask[row].sum()) == int((batch.input_ids[row] != tokenizer.pad_id).sum())


def test_held_out_prompts_never_appear_in_training():
    rng = random.Random(0)
    train = sample_examples(list(TASKS), 2000, rng)
    held = sample_examples(list(TASKS), 300, random.Random(1), held_out=True)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(is_held_out(e.prompt) for e in held)


def test_tasks_answers_are_correct():
    rng = random.Random(0)
    for example in sample_examples(["addition", "sort_digits"], 50, rng):
        if example.task == "addition":
            a, b = example.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(example.response) == int(a) + int(b)
        else:
            assert example.response == "".join(sorted(example.prompt.split(": ")[1]))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": 3}\n')
    with pytest.raises(JobFileError, match=r"data.jsonl:2: expected"):
        read_jsonl(path)
    path.write_text('{"prompt": "hi", "response": "hello"}\nnot json\n')
    with pytest.raises(JobFileError, match=r"data.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "hi", "response": "hello"}\n')
    assert read_jsonl(path)[0].response == "hello"


def test_task_examples_longer_than_max_length_are_skipped():
    batch = TrainingData(DataSpec(max_length=40), CharTokenizer(), seed=0, batch_size=16).batch(0)
    assert batch.input_ids.shape[1] <= 40


def test_jsonl_examples_longer_than_max_length_are_refused_upfront(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "%s", "response": "x"}\n' % ("a" * 80))
    with pytest.raises(JobFileError, match="example 2 is longer than data.max_length=64"):
        TrainingData(DataSpec(source="jsonl", path=path), CharTokenizer(), seed=0, batch_size=2)


def test_a_max_length_no_example_fits_is_a_clear_error():
    with pytest.raises(JobFileError, match="almost no example fits"):
        TrainingData(DataSpec(max_length=8), CharTokenizer(), seed=0, batch_size=1).batch(0)


def test_loss_on_all_tokens_labels_every_real_token():
    from swarm.config import PhaseSpec

    phase = PhaseSpec(kind="pretrain", name="pretrain", steps=1, loss_on="all")
    batch = TrainingData(DataSpec(), CharTokenizer(), seed=0, batch_size=4, phase=phase).batch(0)
    assert ((batch.labels != IGNORE_INDEX) == batch.attention_mask.bool()).all()
