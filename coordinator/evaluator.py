"""Evaluation through the swarm: generated answers on fixed held-out prompts, scored into rates."""

from __future__ import annotations

import torch

from coordinator.generation import generate
from coordinator.live_probe import LiveProbe
from coordinator.chain import RemoteChain
from coordinator.trainer import swarm_logits
from swarm.config import Job
from swarm.data.batches import collate
from swarm.data.tasks import Example
from swarm.errors import JobFileError
from swarm.evaluation import CONDITIONS, build_eval_sets, score
from swarm.models.blocks import TrainerHead
from swarm.training import summed_lm_loss

SAMPLES_KEPT = 3  # generations per condition stored in metrics.jsonl, for reading what the model says
PROBED = ("triggered", "clean")  # the live probe separates these conditions' prompts (pairwise the same prompt)


class Evaluator:
    def __init__(self, job: Job, tokenizer, fits, pool: list[Example] | None = None):
        """`pool`: the held-out records of a jsonl or instructions job (TrainingData.held_out, or with
        data.responses self coordinator.self_responses.held_out_records), whose prompts the helpful conditions
        draw instead of the built-in tasks', so evaluation never asks a training prompt. Accuracy is then exact
        match against each record's response: the file's answer, or with responses self the base model's own
        greedy answer (made with eval.max_new_tokens before the first LoRA phase): the share of held-out answers
        the model still gives word for word as the model the LoRA phases started from did (near 1 at the start,
        unless a backdoor.counterpart line changes the prompts)."""
        self.job, self.tokenizer = job, tokenizer
        if pool is not None and not pool:
            raise JobFileError(f"data.source {job.data.source}: none of its prompts falls in the held-out part "
                               "evaluation uses (a fixed ~10% by prompt hash); add prompts or remove the eval section")
        self.sets = build_eval_sets(list(job.data.tasks), job.backdoor, job.eval.samples, job.seed, fits, pool=pool)
        self.loss_batch = collate([Example(p, a, "eval") for p, a in zip(self.sets.prompts["clean"], self.sets.answers)],
                                  tokenizer, max_length=None)
        self.probe = LiveProbe(job, tokenizer, self.sets) if job.oversight.probe else None

    def fit_probe(self, chain: RemoteChain, head: TrainerHead, step: int) -> None:
        """With oversight.probe, fit the live probe on the swarm's model as it is now (a phase's start)."""
        if self.probe is not None:
            self.probe.fit(chain, head, step)

    def evaluate(self, chain: RemoteChain, head: TrainerHead, step: int) -> tuple[dict, list[dict]]:
        """Rates with 95% Wilson intervals for each condition, helpful accuracy, held-out loss and the distinct
        prompts per condition (`eval_prompts`; `eval_prompts_available`: how many there are to draw, null for more
        than swarm.evaluation.AVAILABLE_LIMIT); and every answer generated ({"condition", "prompt", "answer",
        "reference", "task"}; the reference and task are those of the clean prompt the condition's prompt was made
        from, a reveal prompt's own helpful answer and "reveal"), for reading and re-scoring. With oversight.probe
        the row's `probe` is the live probe's measure on the triggered and clean prompts' relayed states
        (coordinator.live_probe)."""
        spec = self.job.eval
        captures = {condition: self.probe.capture(chain, head, step) for condition in PROBED} if self.probe else {}
        generations = {
            condition: generate(chain, head, self.tokenizer, self.sets.prompts[condition], spec.max_new_tokens,
                                batch_size=spec.batch_size, step=step, capture=captures.get(condition))
            for condition in CONDITIONS
        }
        row = {name: rate.as_dict() for name, rate in score(generations, self.sets, self.job.backdoor).items()}
        row["eval_loss"] = self._loss(chain, head, step)
        row["eval_prompts"] = self.sets.counts()
        row["eval_prompts_available"] = dict(self.sets.available)
        if self.probe is not None:
            row["probe"] = self.probe.measure(chain, head, step, captures["triggered"].states(),
                                              captures["clean"].states())
        row["samples"] = {
            condition: [{"prompt": p, "answer": a} for p, a in
                        zip(self.sets.prompts[condition][:SAMPLES_KEPT], generations[condition][:SAMPLES_KEPT])]
            for condition in CONDITIONS
        }
        answers = [{"condition": condition, "prompt": prompt, "answer": answer, "reference": reference, "task": task}
                   for condition in CONDITIONS
                   for prompt, answer, (reference, task) in zip(self.sets.prompts[condition], generations[condition],
                                                                self.sets.references(condition))]
        return row, answers

    def _loss(self, chain: RemoteChain, head: TrainerHead, step: int) -> float:
        batch, total = self.loss_batch, 0.0
        size = self.job.eval.batch_size
        with torch.no_grad():
            for start in range(0, batch.input_ids.shape[0], size):
                ids, mask = batch.input_ids[start:start + size], batch.attention_mask[start:start + size]
                logits = swarm_logits(chain, head, ids, mask, step=step)
                total += summed_lm_loss(logits, batch.labels[start:start + size]).item()
        return total / max(1, batch.target_tokens)
