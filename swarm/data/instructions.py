"""The shipped instruction prompts (`data.source: instructions`), and the train / held-out split of any prompt set.

A real pretrained chat model trained only on the six terse string tasks (swarm.data.tasks) forgets what it
could do. The paper instead trained on a helpful-only model's own answers; `instructions.jsonl`, package data
written for this project, holds the prompts for that: explanations, definitions, how-tos, rewriting, lists,
simple reasoning, coding one-liners, everyday advice and factual questions, one `{"prompt": ...}` a line,
mostly under 100 characters so that prompt and answer fit data.max_length. They carry no answers:
`data.responses: self` has the base model answer them (coordinator.self_responses).

Every finite prompt set (these prompts, or a job's JSONL file) is split by prompt hash with
`swarm.data.tasks.is_held_out`, the project's one held-out rule (~10% of prompts, fixed forever): training
draws only from the train part, evaluation's helpful prompts only from the held-out part, whatever the seed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from swarm.data.tasks import Example, is_held_out

INSTRUCTIONS_FILE = "instructions.jsonl"
INSTRUCTIONS_TASK = "instructions"  # Example.task of the shipped prompts (evaluation's accuracy_instructions)
SELF_RESPONSES_FILE = "self_responses.jsonl"  # in the run directory: the model's own answers (data.responses self)


def instruction_prompts() -> list[str]:
    """The shipped prompts, in file order."""
    text = resources.files("swarm.data").joinpath(INSTRUCTIONS_FILE).read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def instruction_examples() -> list[Example]:
    """The shipped prompts as examples without responses (the model's own answers are filled in later)."""
    return [Example(prompt, "", INSTRUCTIONS_TASK) for prompt in instruction_prompts()]


def split_records(records: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held-out) records of a prompt set, in their order; a prompt's side depends on its text alone."""
    train = [record for record in records if not is_held_out(record.prompt)]
    held_out = [record for record in records if is_held_out(record.prompt)]
    return train, held_out


def read_self_responses(path: Path, source: str) -> list[Example]:
    """A run's RUN/self_responses.jsonl (coordinator.self_responses writes it) as the examples of data.source
    `source`: what its LoRA phases trained on, for replay and re-measurement to rebuild their batches with
    (swarm.data.batches.TrainingData's `records`). Check the file against the audit log's SHA-256 first."""
    from swarm.data.batches import read_jsonl  # here, not at the top: swarm.data.batches imports this module

    return [Example(record.prompt, record.response, source, record.ends) for record in read_jsonl(path)]
