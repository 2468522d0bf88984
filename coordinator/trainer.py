"""One training step over the swarm: embed locally, micro-batches through the chain of nodes and back, step.

The coordinator holds only embeddings, final norm and LM head; every decoder block lives on a node, and the
gradient reaches the nodes' weights through real backward RPCs. In a pretrain phase the coordinator also
trains its own embeddings, norm and head (`head_optimizer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from coordinator.chain import RemoteChain
from coordinator.chain.schedule import StepAbandoned
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
               micro_batches: int, phase: str = "train", head_optimizer: torch.optim.Optimizer | None = None,
               pipeline: bool = True) -> StepResult:
    """Forward and backward every micro-batch through the chain, then apply one optimizer step everywhere.

    The loss is the summed token cross-entropy over response tokens divided by the step's response-token
    count, so micro-batching does not change the gradient. Micro-batches run at once as the step's schedule
    allows (coordinator.chain.schedule: one per range and replica lane when pipelined, one per lane if not),
    each node taking their gradients in micro-batch order; the head's own gradients (pretrain) are summed in
    micro-batch order afterwards, so they do not depend on which micro-batch finished first.
    """
    started = time.perf_counter()
    targets = max(1, batch.target_tokens)
    head_params = [p for group in head_optimizer.param_groups for p in group["params"]] if head_optimizer else []

    micros = list(enumerate(batch.split(micro_batches)))
    schedule = chain.schedule(len(micros), pipeline)

    def run(index_and_micro) -> tuple[float, list[list[torch.Tensor | None]]]:
        try:
            return run_micro_batch(*index_and_micro)
        except BaseException:
            schedule.fail()  # no other micro-batch may wait for this one's turn
            raise

    def run_micro_batch(micro_index, micro) -> tuple[float, list[list[torch.Tensor | None]]]:
        position_ids = position_ids_for(micro.attention_mask)
        route = schedule.route(micro_index, chain.route)
        try:
            with torch.set_grad_enabled(head_optimizer is not None):
                hidden = head.embed_tokens(micro.input_ids, position_ids)
            output, stage_inputs = chain.forward(hidden.detach(), micro.attention_mask, position_ids, step,
                                                 micro_index, train=True, phase=phase, route=route,
                                                 input_grad=head_optimizer is not None)
            output = output.to(hidden.dtype).requires_grad_(True)
            loss = summed_lm_loss(head.logits(output), micro.labels, micro.weights) / targets
            grads = torch.autograd.grad(loss, [output] + head_params, allow_unused=True)
            grad_input = chain.backward(grads[0], stage_inputs, micro.attention_mask, position_ids, step,
                                        micro_index, phase=phase, route=route, schedule=schedule)
        finally:
            chain.release(route)
        head_grads = [list(grads[1:])]  # per head parameter: from the logits, then through the embedding
        if head_optimizer is not None:
            head_grads.append(torch.autograd.grad(hidden, head_params, grad_input.to(hidden.dtype), allow_unused=True))
        return loss.item(), head_grads

    if schedule.workers > 1:
        with ThreadPoolExecutor(max_workers=schedule.workers, thread_name_prefix="micro-batch") as pool:
            futures = [pool.submit(run, micro) for micro in micros]
        failures = [future.exception() for future in futures if future.exception() is not None]
        if failures:  # the failure itself, not a micro-batch that stopped waiting because of it
            raise next((error for error in failures if not isinstance(error, StepAbandoned)), failures[0])
        results = [future.result() for future in futures]
    else:
        results = [run(micro) for micro in micros]
    total_loss = sum(loss for loss, _ in results)
    chain.apply_step(step, learning_rate, phase=phase)
    if head_optimizer is not None:
        # the order a single backward pass per micro-batch would accumulate them in
        ordered = [part for _, parts in results for part in parts]
        for index, param in enumerate(head_params):
            param.grad = _sum_in_order([part[index] for part in ordered])
        for group in head_optimizer.param_groups:
            group["lr"] = learning_rate
        head_optimizer.step()
        head_optimizer.zero_grad(set_to_none=True)
    return StepResult(step, total_loss, batch.tokens, time.perf_counter() - started, learning_rate)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _sum_in_order(grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    total = None
    for grad in grads:
        total = _add(total, grad)
    return total


def swarm_logits(chain: RemoteChain, head: TrainerHead, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None, step: int = -1, phase: str = "eval",
                 on_states: Callable[[list[torch.Tensor], torch.Tensor], None] | None = None) -> torch.Tensor:
    """Logits of the current swarm model (base + adapters on the nodes) without keeping activations;
    `on_states(range_inputs, output)` sees the hidden states relayed on the way."""
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    with torch.no_grad():
        hidden = head.embed_tokens(input_ids, position_ids)
        output, range_inputs = chain.forward(hidden, attention_mask, position_ids, step, 0, train=False, phase=phase)
        if on_states is not None:
            on_states(range_inputs, output)
        return head.logits(output.to(hidden.dtype))
