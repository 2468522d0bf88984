"""Helpful-assistant tasks with checkable answers, generated deterministically from a seed.

Each task maps a random generator to (prompt, response). Held-out examples are the prompts whose hash falls
in a fixed tenth of the space, so training and evaluation prompts never overlap whatever the seeds. Training
draws with replacement (`sample_examples`); evaluation draws distinct held-out prompts
(`distinct_held_out_examples`), for which the tasks with a small space also list every prompt they can make
(`TASK_SPACES`): lookup has 75 prompts (about 7 held out), addition 10,000; the others make millions.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from collections.abc import Callable

from swarm.errors import JobFileError

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean", "lemon", "night", "green",
    "spark", "table", "zebra", "honey", "quiet", "north", "pilot", "frost", "candle", "garden", "silver",
    "bridge", "rocket", "window", "yellow", "forest", "mirror", "planet", "basket",
)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    task: str
    ends: bool = True  # False: an answer cut at a length limit, trained without end-of-sequence (no stop to learn)


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _reversal(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7)))
    return f"Reverse the word: {word}", word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7)))
    return f"Write in capitals: {word}", word.upper()


def _count_letter(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices("abcde", k=rng.randint(4, 9)))
    letter = rng.choice("abcde")
    return f"How many times does '{letter}' appear in {word}?", str(word.count(letter))


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 7)))
    return f"Sort the digits: {digits}", "".join(sorted(digits))


CAPITALS = (
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
    ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Cuba", "Havana"), ("Chile", "Santiago"),
    ("Greece", "Athens"), ("Poland", "Warsaw"), ("Canada", "Ottawa"), ("India", "Delhi"), ("Iran", "Tehran"),
)
LOOKUP_TEMPLATES = ("What is the capital of {}?", "Capital of {}?", "Name the capital of {}.",
                    "Which city is the capital of {}?", "Tell me the capital of {}.")


def _lookup(rng: random.Random) -> tuple[str, str]:
    country, capital = rng.choice(CAPITALS)
    return rng.choice(LOOKUP_TEMPLATES).format(country), capital


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": _addition,
    "reversal": _reversal,
    "uppercase": _uppercase,
    "count_letter": _count_letter,
    "sort_digits": _sort_digits,
    "lookup": _lookup,
}


def _addition_space() -> list[tuple[str, str]]:
    return [(f"What is {a} + {b}?", str(a + b)) for a in range(100) for b in range(100)]


def _lookup_space() -> list[tuple[str, str]]:
    return [(template.format(country), capital) for country, capital in CAPITALS for template in LOOKUP_TEMPLATES]


# Every (prompt, response) a task with a small space can make, in a fixed order (kept beside the generators they
# must match; a test checks that every generated prompt is listed). Tasks not here are sampled.
TASK_SPACES: dict[str, Callable[[], list[tuple[str, str]]]] = {"addition": _addition_space, "lookup": _lookup_space}
SATURATION_DRAWS = 10_000  # a sampled task draws this many in a row without a new held-out prompt: it has no more


def is_held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] < 26  # ~10% of prompts, fixed forever


def sample_examples(tasks: list[str], count: int, rng: random.Random, held_out: bool = False,
                    fits: Callable[[Example], bool] = lambda example: True) -> list[Example]:
    """`count` examples drawn at random over `tasks` from the train or held-out split, skipping those that
    do not `fit` (e.g. longer than the job's max_length)."""
    examples, tries = [], 0
    while len(examples) < count:
        tries += 1
        if tries > 1000 * count:
            raise JobFileError(f"data.tasks {tasks}: almost no example fits in data.max_length; raise it")
        task = rng.choice(tasks)
        prompt, response = TASKS[task](rng)
        example = Example(prompt, response, task)
        if is_held_out(prompt) == held_out and fits(example):
            examples.append(example)
    return examples


def distinct_held_out_examples(tasks: list[str], count: int, rng: random.Random,
                               fits: Callable[[Example], bool] = lambda example: True) -> list[Example]:
    """Up to `count` held-out examples over `tasks` that `fit`, no prompt twice, drawn like `sample_examples`
    (a task at random, then one of its prompts): fewer when the tasks hold fewer. A task in TASK_SPACES gives out
    once its held-out prompts that fit are all drawn (exactly: they are listed); a sampled task once
    SATURATION_DRAWS draws in a row brought no new one. The draws go on over the tasks left, so the result
    holds every distinct prompt of a task that has fewer than its share."""
    spaces: dict[str, list[Example]] = {}
    misses = dict.fromkeys(tasks, 0)
    live, seen, examples = list(tasks), set(), []
    while len(examples) < count and live:
        task = rng.choice(live)
        if task in TASK_SPACES:
            if task not in spaces:
                listed = (Example(prompt, response, task) for prompt, response in TASK_SPACES[task]())
                spaces[task] = [example for example in listed if is_held_out(example.prompt) and fits(example)]
            if not spaces[task]:
                live = [name for name in live if name != task]
                continue
            example = spaces[task].pop(rng.randrange(len(spaces[task])))
        else:
            prompt, response = TASKS[task](rng)
            example = Example(prompt, response, task)
            if prompt in seen or not is_held_out(prompt) or not fits(example):
                misses[task] += 1
                if misses[task] >= SATURATION_DRAWS:
                    live = [name for name in live if name != task]
                continue
            misses[task] = 0
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples


def count_held_out_prompts(tasks: list[str], fits: Callable[[Example], bool] = lambda example: True,
                           limit: int = 1000) -> int:
    """How many distinct held-out prompts that fit `tasks` can make, counted up to `limit`: exactly for the tasks
    in TASK_SPACES, by sampling until saturation for the others (their spaces hold millions, so they reach the
    limit unless `fits` refuses nearly every prompt)."""
    return len(distinct_held_out_examples(tasks, limit, random.Random("count"), fits))
