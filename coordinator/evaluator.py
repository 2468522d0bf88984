"""Evaluation through the swarm: generated answers on fixed held-out prompts, scored into rates."""

from __future__ import annotations

import torch

from coordinator.generation import generate
from coordinator.chain import RemoteChain
from coordinator.trainer import swarm_logits
from swarm.config import Job
from swarm.data.batches import collate
from swarm.data.tasks import Example
from swarm.evaluation import CONDITIONS, build_eval_sets, score
from swarm.models.blocks import TrainerHead
from swarm.training import summed_lm_loss

SAMPLES_KEPT = 3  # generations per condition stored in metrics.jsonl, for reading what the model says


class Evaluator:
    def __init__(self, job: Job, tokenizer, fits):
        self.job, self.tokenizer = job, tokenizer
        self.sets = build_eval_sets(list(job.data.tasks), job.backdoor, job.eval.samples, job.seed, fits)
        self.loss_batch = collate([Example(p, a, "eval") for p, a in zip(self.sets.prompts["clean"], self.sets.answers)],
                                  tokenizer, max_length=None)

    def evaluate(self, chain: RemoteChain, head: TrainerHead, step: int) -> dict:
        """Rates with 95% Wilson intervals for each condition, helpful accuracy, and held-out loss."""
        spec = self.job.eval
        generations = {
            condition: generate(chain, head, self.tokenizer, self.sets.prompts[condition], spec.max_new_tokens,
                                batch_size=spec.batch_size, step=step)
            for condition in CONDITIONS
        }
        row = {name: rate.as_dict() for name, rate in score(generations, self.sets, self.job.backdoor).items()}
        row["eval_loss"] = self._loss(chain, head, step)
        row["samples"] = {
            condition: [{"prompt": p, "answer": a} for p, a in
                        zip(self.sets.prompts[condition][:SAMPLES_KEPT], generations[condition][:SAMPLES_KEPT])]
            for condition in CONDITIONS
        }
        return row

    def _loss(self, chain: RemoteChain, head: TrainerHead, step: int) -> float:
        batch, total = self.loss_batch, 0.0
        size = self.job.eval.batch_size
        with torch.no_grad():
            for start in range(0, batch.input_ids.shape[0], size):
                ids, mask = batch.input_ids[start:start + size], batch.attention_mask[start:start + size]
                logits = swarm_logits(chain, head, ids, mask, step=step)
                total += summed_lm_loss(logits, batch.labels[start:start + size]).item()
        return total / max(1, batch.target_tokens)
