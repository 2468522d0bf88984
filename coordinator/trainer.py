"""The trainer loop: embed locally, run micro-batches through the chain of nodes and back, step, log.

The coordinator holds only embeddings, final norm and LM head; every decoder block lives on a node, and the
gradient reaches the nodes' LoRA weights through real backward RPCs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from coordinator.remote_chain import RemoteChain
from coordinator.run_dir import MetricsLog
from swarm.config import Job
from swarm.data.batches import TrainingData
from swarm.models.blocks import TrainerHead
from swarm.training import learning_rate, position_ids_for, summed_lm_loss


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    seconds: float
    learning_rate: float


def train_step(chain: RemoteChain, head: TrainerHead, data: TrainingData, job: Job, step: int) -> StepResult:
    started = time.perf_counter()
    batch = data.batch(step)
    targets = batch.target_tokens
    total_loss = 0.0
    for micro_index, micro in enumerate(batch.split(job.training.micro_batches)):
        position_ids = position_ids_for(micro.attention_mask)
        with torch.no_grad():
            hidden = head.embed_tokens(micro.input_ids)
        output, stage_inputs = chain.forward(hidden, micro.attention_mask, position_ids, step, micro_index, train=True)
        output = output.to(hidden.dtype).requires_grad_(True)
        loss = summed_lm_loss(head.logits(output), micro.labels) / targets
        loss.backward()
        total_loss += loss.item()
        chain.backward(output.grad, stage_inputs, micro.attention_mask, position_ids, step, micro_index)
    lr = learning_rate(job.optimizer, step, job.training.steps)
    chain.apply_step(step, lr)
    return StepResult(step, total_loss, batch.tokens, time.perf_counter() - started, lr)


def swarm_logits(chain: RemoteChain, head: TrainerHead, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 step: int = -1) -> torch.Tensor:
    """Logits of the current swarm model (base + adapters on the nodes) without keeping activations."""
    position_ids = position_ids_for(attention_mask)
    with torch.no_grad():
        hidden = head.embed_tokens(input_ids)
        output, _ = chain.forward(hidden, attention_mask, position_ids, step, 0, train=False, phase="eval")
        return head.logits(output.to(hidden.dtype))


def train(chain: RemoteChain, head: TrainerHead, data: TrainingData, job: Job, metrics: MetricsLog,
          on_step=None, progress: bool = True) -> list[StepResult]:
    results = []
    bar = tqdm(range(job.training.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        result = train_step(chain, head, data, job, step)
        results.append(result)
        metrics.write({
            "phase": "train", "step": step, "loss": result.loss, "tokens": result.tokens,
            "seconds": round(result.seconds, 6), "lr": result.learning_rate,
            "bytes_sent": chain.bytes_sent, "bytes_received": chain.bytes_received,
        })
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.seconds:.0f}")
        if on_step is not None:
            on_step(result)
    bar.close()
    return results
