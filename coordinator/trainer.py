"""One training step over the swarm: embed locally, micro-batches through the chain of nodes and back, step.

The coordinator holds only embeddings, final norm and LM head; every decoder block lives on a node, and the
gradient reaches the nodes' weights through real backward RPCs. In a pretrain phase the coordinator also
trains its own embeddings, norm and head (`head_optimizer`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from coordinator.remote_chain import RemoteChain
from swarm.data.batches import Batch
from swarm.models.blocks import TrainerHead
from swarm.training import position_ids_for, summed_lm_loss


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    seconds: float
    learning_rate: float


def train_step(chain: RemoteChain, head: TrainerHead, batch: Batch, step: int, learning_rate: float,
               micro_batches: int, phase: str = "train", head_optimizer: torch.optim.Optimizer | None = None
               ) -> StepResult:
    """Forward and backward every micro-batch through the chain, then apply one optimizer step everywhere.

    The loss is the summed token cross-entropy over response tokens divided by the step's response-token
    count, so micro-batching does not change the gradient.
    """
    started = time.perf_counter()
    targets = max(1, batch.target_tokens)
    total_loss = 0.0
    for micro_index, micro in enumerate(batch.split(micro_batches)):
        position_ids = position_ids_for(micro.attention_mask)
        with torch.set_grad_enabled(head_optimizer is not None):
            hidden = head.embed_tokens(micro.input_ids, position_ids)
        output, stage_inputs = chain.forward(hidden.detach(), micro.attention_mask, position_ids, step, micro_index,
                                             train=True, phase=phase)
        output = output.to(hidden.dtype).requires_grad_(True)
        loss = summed_lm_loss(head.logits(output), micro.labels, micro.weights) / targets
        loss.backward()
        total_loss += loss.item()
        grad_input = chain.backward(output.grad, stage_inputs, micro.attention_mask, position_ids, step, micro_index,
                                    phase=phase)
        if head_optimizer is not None:
            hidden.backward(grad_input.to(hidden.dtype))
    chain.apply_step(step, learning_rate, phase=phase)
    if head_optimizer is not None:
        for group in head_optimizer.param_groups:
            group["lr"] = learning_rate
        head_optimizer.step()
        head_optimizer.zero_grad(set_to_none=True)
    return StepResult(step, total_loss, batch.tokens, time.perf_counter() - started, learning_rate)


def swarm_logits(chain: RemoteChain, head: TrainerHead, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, step: int = -1, phase: str = "eval") -> torch.Tensor:
    """Logits of the current swarm model (base + adapters on the nodes) without keeping activations."""
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    with torch.no_grad():
        hidden = head.embed_tokens(input_ids, position_ids)
        output, _ = chain.forward(hidden, attention_mask, position_ids, step, 0, train=False, phase=phase)
        return head.logits(output.to(hidden.dtype))
