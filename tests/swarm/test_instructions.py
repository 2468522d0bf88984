"""The shipped instruction prompts (swarm/data/instructions.jsonl) and the fixed train / held-out split."""

import json
import random
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

import pytest

from swarm.config import DataSpec, PhaseSpec
from swarm.data.batches import TrainingData
from swarm.data.instructions import INSTRUCTIONS_FILE, instruction_examples, instruction_prompts, split_records
from swarm.data.tasks import TASKS
from swarm.data.tokenizer import CharTokenizer
from swarm.errors import JobFileError

REPO = Path(__file__).resolve().parents[2]
SELF = {"source": "instructions", "responses": "self"}


def test_there_are_at_least_300_distinct_non_empty_prompts():
    prompts = instruction_prompts()
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    assert len({" ".join(p.lower().split()) for p in prompts}) == len(prompts)  # not even re-cased or re-spaced
    assert all(isinstance(p, str) and p.strip() == p and p for p in prompts)


def test_prompts_are_short_enough_for_their_answers_to_fit():
    lengths = [len(p) for p in instruction_prompts()]
    assert max(lengths) <= 160
    assert sum(n < 100 for n in lengths) >= 0.95 * len(lengths)


def test_prompts_are_more_than_the_string_tasks():
    prompts = instruction_prompts()
    task_like = ("What is ", "Reverse the word", "Write in capitals", "Sort the digits", "How many times does")
    openings = {" ".join(p.split()[:2]) for p in prompts}
    assert len(openings) >= 60  # many kinds of request, not one template
    assert sum(p.startswith(task_like) for p in prompts) < len(prompts) / 4
    assert any(p.startswith("How do I") for p in prompts) and any("Python" in p for p in prompts)


def test_the_file_is_one_json_object_with_a_prompt_per_line():
    lines = (REPO / "swarm" / "data" / INSTRUCTIONS_FILE).read_text().splitlines()
    assert [list(json.loads(line)) for line in lines] == [["prompt"]] * len(lines)


def test_an_installed_package_ships_the_prompts():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert f"data/{INSTRUCTIONS_FILE}" in package_data["swarm"]


def test_the_split_is_disjoint_complete_and_holds_out_a_tenth_or_so():
    examples = instruction_examples()
    train, held_out = split_records(examples)
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert len(train) + len(held_out) == len(examples)
    assert 0.05 <= len(held_out) / len(examples) <= 0.2


def test_the_split_depends_on_each_prompt_alone_and_never_changes():
    examples = instruction_examples()
    shuffled = list(examples)
    random.Random(7).shuffle(shuffled)
    held = {e.prompt for e in split_records(examples)[1]}
    assert {e.prompt for e in split_records(shuffled)[1]} == held
    assert {e.prompt for e in split_records(examples[:50])[1]} == held & {e.prompt for e in examples[:50]}
    # Fixed forever: these prompts' sides were measured when the set was written.
    assert {"How do I defrost a freezer?", "What is a budget?", "Write an opening line for a fantasy story."} <= held
    assert not {"What does 'pragmatic' mean?", "Explain recycling to a ten-year-old.",
                "Use 'concise' in a sentence."} & held


def test_training_draws_only_train_prompts_and_evaluation_gets_the_rest():
    data = TrainingData(DataSpec(**SELF, max_length=256), CharTokenizer(), seed=0, batch_size=64)
    train, held_out = split_records(instruction_examples())
    assert data.records == train and data.held_out == held_out
    assert data.awaiting_self_responses  # no answers yet: only the prompts' room is checked
    assert all(e.prompt in {r.prompt for r in train} for step in range(5) for e in data.examples(step))


def test_a_max_length_without_room_for_the_answers_is_refused_before_anything_starts():
    with pytest.raises(JobFileError, match=r"data.self_max_new_tokens=48 .* raise data.max_length to at least \d+"):
        TrainingData(DataSpec(**SELF, max_length=64), CharTokenizer(), seed=0, batch_size=4)


def test_a_pretrain_phase_of_a_self_responses_job_trains_on_the_tasks():
    phase = PhaseSpec(kind="pretrain", name="pretrain", steps=1)
    data = TrainingData(DataSpec(**SELF, tasks=["reversal"], max_length=256), CharTokenizer(), 0, 8, phase)
    assert data.records is None
    assert {e.task for e in data.examples(0)} == {"reversal"} and "reversal" in TASKS
