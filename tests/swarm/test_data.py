import json
import random

import pytest

from swarm.config import DataSpec
from swarm.data.batches import IGNORE_INDEX, TrainingData, read_jsonl
from swarm.data.tasks import (TASK_SPACES, TASKS, Example, count_held_out_prompts, distinct_held_out_examples,
                              is_held_out, sample_examples)
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


def test_listed_task_spaces_hold_every_prompt_their_generator_makes():
    for task, space in TASK_SPACES.items():
        listed = dict(space())
        drawn = sample_examples([task], 3000, random.Random(0))
        assert all(listed[example.prompt] == example.response for example in drawn), task
    assert (len(TASK_SPACES["addition"]()), len(TASK_SPACES["lookup"]())) == (10_000, 75)


def test_distinct_held_out_examples_are_distinct_held_out_and_stop_when_none_are_left():
    examples = distinct_held_out_examples(list(TASKS), 500, random.Random(0))
    assert len(examples) == 500 and len({e.prompt for e in examples}) == 500
    assert all(is_held_out(e.prompt) for e in examples) and {e.task for e in examples} == set(TASKS)
    lookup = [prompt for prompt, _ in TASK_SPACES["lookup"]() if is_held_out(prompt)]
    few = distinct_held_out_examples(["lookup"], 64, random.Random(0))
    assert sorted(e.prompt for e in few) == sorted(lookup) and len(lookup) < 64
    mixed = distinct_held_out_examples(["lookup", "addition"], 200, random.Random(0))
    assert len(mixed) == 200 and {e.prompt for e in mixed if e.task == "lookup"} == set(lookup)


def test_held_out_prompts_are_counted_exactly_for_listed_tasks_and_up_to_the_limit_for_sampled_ones():
    addition = sum(is_held_out(prompt) for prompt, _ in TASK_SPACES["addition"]())
    assert count_held_out_prompts(["addition"], limit=5000) == addition
    assert count_held_out_prompts(["lookup"]) == sum(is_held_out(p) for p, _ in TASK_SPACES["lookup"]())
    assert count_held_out_prompts(["reversal", "uppercase"], limit=300) == 300
    short = count_held_out_prompts(["addition"], fits=lambda e: len(e.prompt) <= len("What is 1 + 2?"), limit=5000)
    assert short == sum(is_held_out(f"What is {a} + {b}?") for a in range(10) for b in range(10))


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


def _jsonl(path, prompts, responses=True):
    lines = [json.dumps({"prompt": p, **({"response": f"answer {i}"} if responses else {})}) for i, p in enumerate(prompts)]
    path.write_text("\n".join(lines) + "\n")
    return path


PROMPTS = [f"Tell me fact number {n}." for n in range(40)]


def test_jsonl_records_split_by_prompt_hash_and_training_draws_only_the_train_part(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", PROMPTS)
    data = TrainingData(DataSpec(source="jsonl", path=path), CharTokenizer(), seed=0, batch_size=16)
    held = {p for p in PROMPTS if is_held_out(p)}
    assert held and {e.prompt for e in data.held_out} == held
    assert {e.prompt for e in data.records} == set(PROMPTS) - held
    assert not {e.prompt for step in range(20) for e in data.examples(step)} & held


def test_jsonl_lines_without_a_response_are_refused_naming_the_line_unless_the_model_answers(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "and you?"}\n')
    with pytest.raises(JobFileError, match=r'data.jsonl:2: no "response".*data.responses: self'):
        read_jsonl(path)
    assert [e.response for e in read_jsonl(path, responses=False)] == ["", ""]
    path.write_text('{"prompt": "hi", "response": 3}\n')
    with pytest.raises(JobFileError, match=r"data.jsonl:1: expected"):
        read_jsonl(path, responses=False)


def test_self_responses_train_on_the_records_given_and_nothing_else(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", PROMPTS, responses=False)
    spec = DataSpec(source="jsonl", path=path, responses="self", self_max_new_tokens=16)
    waiting = TrainingData(spec, CharTokenizer(), seed=0, batch_size=8)
    assert waiting.awaiting_self_responses and {e.response for e in waiting.records} == {""}
    records = [Example(p, f"mine {i}", "jsonl") for i, p in enumerate(PROMPTS)]
    data = TrainingData(spec, CharTokenizer(), seed=0, batch_size=8, records=records)
    assert not data.awaiting_self_responses
    answers = {r.response for r in records if not is_held_out(r.prompt)}
    drawn = [e for step in range(10) for e in data.examples(step)]
    assert {e.response for e in drawn} <= answers
    again = TrainingData(spec, CharTokenizer(), seed=0, batch_size=8, records=records)
    assert again.examples(3) == data.examples(3)  # a function of (seed, phase, step) given the records


@pytest.mark.parametrize(("data", "message"), [
    ({"source": "tasks", "responses": "self"}, "data.responses 'self' needs a finite prompt set"),
    ({"source": "instructions"}, "data.source 'instructions' has prompts only: set data.responses: self"),
    ({"source": "instructions", "responses": "self", "path": "x.jsonl"}, "data.path applies to data.source 'jsonl'"),
    ({"source": "jsonl", "responses": "self"}, "data.source 'jsonl' needs data.path"),
    ({"responses": "mine"}, "responses"),
    ({"source": "jsonl", "path": "x.jsonl", "responses": "self", "self_max_new_tokens": 0}, "self_max_new_tokens"),
])
def test_data_settings_that_cannot_work_are_refused_naming_the_field(data, message):
    from swarm.config import parse_job
    from tests.conftest import job_dict

    with pytest.raises(JobFileError, match=message):
        parse_job(job_dict(data=data))
