"""A node's share of the model: its blocks with LoRA, the AdamW state, and the activations kept for backward.

All methods run on the node's single compute thread, in the order calls arrive. Each training call also
records what the node's attestation of the step will say (input hashes, tokens, time), and `apply_step`
returns that account, so the attestation describes the work actually done, not what the trainer claims.
What a call hands the shard is checked (node.input_checks) before anything changes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from node.dishonest import after_update, check_dishonest_mode, sketched_gradient
from node.inference_sessions import InferenceSessions
from node.input_checks import (check_gradient_finite, check_gradient_shape, check_hidden_states, check_infer_inputs,
                               check_replica_state, check_restore)
from swarm.audit.sketch import gradient_sketch, tensor_sha256
from swarm.block_range import BlockRange
from swarm.config import LoraSpec, OptimizerSpec
from swarm.lora import (add_lora, adapter_state, base_parameters, compute_lora, init_lora_weights, lora_is_zero,
                        merge_lora)
from swarm.models.blocks import BlockStack
from swarm.models.checkpoint import Checkpoint, tensors_sha256
from swarm.p2p.replica_sum import flatten_gradient, unflatten_gradient
from swarm.p2p.rpc import WEIGHTS_PREFIX
from swarm.training import load_adam_state, make_optimizer

logger = logging.getLogger(__name__)

MAX_CACHED_ACTIVATIONS = 64


class MissingActivations(Exception):
    """Backward for a micro-batch whose forward activations this node no longer holds."""


@dataclass
class StepWork:
    """A node's own account of one applied optimizer step (its attestation, less identity and bytes).

    The weight hashes are of what the phase trains, in the exported float32 form: the adapter under PEFT
    names in LoRA phases, the base block tensors under checkpoint names in `pretrain`.
    """

    step: int
    micro_batches: dict[int, str]  # micro-batch id -> SHA-256 of its input as received, in accumulation order
    tokens: int
    compute_seconds: float
    weights_sha256_before: str
    weights_sha256_after: str
    optimizer_sha256_before: str
    optimizer_sha256_after: str
    gradient_sketch: list[float]  # of the gradient AdamW used (with replicas: the group's sum)
    local_gradient_sketch: list[float]  # of this node's own gradient


@dataclass
class StepState:
    """What the trained weights and the AdamW state were before and after the last applied step.

    A node keeps this for every step, because it cannot know which steps the coordinator will snapshot for
    replay: it is asked only after the step is done.
    """

    step: int
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]


@dataclass
class _PendingStep:
    """What the training calls of a step not yet applied did, keyed by micro-batch id (a retry overwrites)."""

    inputs: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    # micro-batches in the order their gradients were added up (float addition depends on it; replay follows it)
    accumulated: list[int] = field(default_factory=list)


class Shard:
    def __init__(self, checkpoint: Checkpoint, start: int, end: int, lora: LoraSpec, optimizer: OptimizerSpec,
                 seed: int, dtype: torch.dtype, device: torch.device, dishonest: str | None = None,
                 sessions: InferenceSessions | None = None):
        check_dishonest_mode(dishonest)
        self.sessions = sessions or InferenceSessions()
        self.weights_version = 0  # counts weight changes: a session's keys and values hold for one version
        self.dishonest = dishonest  # research only: node.dishonest
        self.start, self.end, self.device, self.dtype = start, end, device, dtype
        self.blocks = BlockStack(checkpoint, start, end, dtype, device)
        self.hidden_size = checkpoint.config.hidden_size
        add_lora(self.blocks, lora, seed)
        self.blocks.train()
        self.optimizer_spec = optimizer
        self.sketch_seed = seed
        self._enter_phase("", "sft", last_applied_step=-1)  # before any phase: the adapter trains

    def _enter_phase(self, name: str, kind: str, last_applied_step: int) -> None:
        """Set the training state the next steps start from, the same way whichever call moves the shard
        (a new phase, a restore, a replica's state): phase `name` of `kind` after step `last_applied_step`;
        pretrain trains the base weights with LoRA frozen, other kinds the adapter with the base frozen; fresh
        AdamW state over exactly what trains; nothing kept of steps not applied or of the last applied one."""
        train_base = kind == "pretrain"
        # Pretraining under an adapter that adds nothing (B = 0, as LoRA starts) skips its matmuls: the same
        # function and gradients to the bit (it adds exact zeros), a quarter less of a small block's compute.
        compute_lora(self.blocks, enabled=not (train_base and lora_is_zero(self.blocks)))
        for param_name, param in self.blocks.named_parameters():
            param.requires_grad_((".lora_" in param_name) != train_base)
            param.grad = None  # of a step this shard will not apply
        self.optimizer = make_optimizer([p for p in self.blocks.parameters() if p.requires_grad], self.optimizer_spec)
        self.phase_name, self.phase_kind, self.last_applied_step = name, kind, last_applied_step
        self.weights_version += 1
        self.activations: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # Results of finished backward calls, so a call retried after a lost reply is not applied twice.
        self.finished_backward: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.pending: dict[int, _PendingStep] = {}
        self.last_step_state: StepState | None = None
        self._weights_sha256: str | None = None  # of the trained weights now; None when unknown
        self._optimizer_sha256: str | None = None  # of the AdamW state now; None when unknown

    @property
    def block_range(self) -> BlockRange:
        return BlockRange(self.start, self.end)

    def forward(self, step: int, micro_batch: int, train: bool, hidden: torch.Tensor,
                attention_mask: torch.Tensor, position_ids: torch.Tensor, input_grad: bool = True) -> torch.Tensor:
        """The blocks over `hidden`; in training, their activations are kept for the backward call, with the
        graph back to the input only if `input_grad` (the first range of a LoRA phase has no use for it)."""
        check_hidden_states(hidden, attention_mask, position_ids, self.hidden_size)
        started = time.perf_counter()
        inputs = self._on_device(hidden, attention_mask, position_ids)
        if train:
            self._record_input(step, micro_batch, hidden, attention_mask)
            output, leaf = self._forward_with_grad(inputs, input_grad)
            self.activations[(step, micro_batch)] = (output, leaf)
            while len(self.activations) > MAX_CACHED_ACTIVATIONS:
                self.activations.popitem(last=False)
            result = output.detach()
        else:
            with torch.no_grad():
                result = self.blocks(*inputs)
        if train:
            self.pending[step].seconds += time.perf_counter() - started
        return result.float().cpu()

    def infer(self, session_id: str, past_length: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Generation: the blocks over the positions after the session's first `past_length`, whose keys and
        values this node kept (node.inference_sessions); `attention_mask` covers all positions. Returns the new
        positions' outputs and how many positions the node now keeps for the session."""
        check_infer_inputs(hidden, attention_mask, position_ids, past_length, self.hidden_size)
        inputs = self._on_device(hidden, attention_mask, position_ids)
        with torch.no_grad():
            output, kept = self.sessions.run(session_id, past_length, self.weights_version, self.blocks.new_cache,
                                             lambda cache: self.blocks(*inputs, cache=cache))
        return output.float().cpu(), kept

    def _on_device(self, hidden, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return hidden.to(self.device, self.dtype), attention_mask.to(self.device), position_ids.to(self.device)

    def _forward_with_grad(self, inputs, input_grad: bool):
        """(output, the input leaf whose gradient backward returns; None when `input_grad` is off)."""
        hidden = inputs[0].detach().requires_grad_(input_grad)
        return self.blocks(hidden, inputs[1], inputs[2]), hidden if input_grad else None

    def backward(self, step: int, micro_batch: int, grad_output: torch.Tensor,
                 resent_inputs: list[torch.Tensor] | None, input_grad: bool = True) -> torch.Tensor:
        """Accumulate the trained weights' gradients and return the gradient w.r.t. this range's input hidden
        states; without `input_grad`, an empty tensor (nothing is computed for it)."""
        key = (step, micro_batch)
        if key in self.finished_backward:
            return self.finished_backward[key]
        started = time.perf_counter()
        # Every check before anything changes: a refused backward must leave the cached activations and the
        # step's recorded inputs as they were (the fuzz tests hold the node to that).
        check_gradient_finite(grad_output)
        cached = self.activations.get(key)
        if cached is None:
            if not resent_inputs:
                raise MissingActivations(f"no activations for step {step} micro-batch {micro_batch}")
            hidden, attention_mask, position_ids = resent_inputs
            check_hidden_states(hidden, attention_mask, position_ids, self.hidden_size)
            check_gradient_shape(grad_output, hidden)  # a range's blocks keep the hidden states' shape
            self._record_input(step, micro_batch, hidden, attention_mask)
            output, leaf = self._forward_with_grad(self._on_device(hidden, attention_mask, position_ids), input_grad)
        else:
            output, leaf = cached
            check_gradient_shape(grad_output, output)
            if input_grad and leaf is None:
                raise ValueError(f"step {step} micro-batch {micro_batch}: its forward call said the input gradient "
                                 "is unused, so none can be returned")
            del self.activations[key]
        output.backward(grad_output.to(self.device, output.dtype))
        pending = self.pending.setdefault(step, _PendingStep())
        pending.seconds += time.perf_counter() - started
        pending.accumulated.append(micro_batch)
        grad_input = leaf.grad.float().cpu() if input_grad else torch.empty(0)
        self.finished_backward[key] = grad_input
        while len(self.finished_backward) > MAX_CACHED_ACTIVATIONS:
            self.finished_backward.popitem(last=False)
        return grad_input

    def _record_input(self, step: int, micro_batch: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
        pending = self.pending.setdefault(step, _PendingStep())
        pending.inputs[micro_batch] = tensor_sha256(hidden)
        pending.tokens[micro_batch] = int(attention_mask.sum())

    def apply_step(self, step: int, learning_rate: float,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepWork | None:
        """Apply AdamW once for `step` and return the account of the step; None (and no change) when a
        step with this or a later id was already applied.

        `reduce` (replicas): takes this node's gradient, flattened in name order, and returns the replica
        group's sum, which the step then uses. If it raises, nothing changes and the step can be tried again.
        """
        if step <= self.last_applied_step:
            return None
        if step not in self.pending:
            if reduce is None:
                raise ValueError(f"step {step}: no forward or backward call of it reached this node; nothing to apply")
            self.pending[step] = _PendingStep()  # a replica that got no micro-batch still takes the group's sum
        started = time.perf_counter()
        trained = self._trained_parameters()
        # Between steps only gradients change, so the state after the last step is the state before this one.
        before = (self.last_step_state.after if self.last_step_state is not None
                  else _training_state(trained, self.optimizer))
        weights_before = self._weights_sha256 or _weights_sha256(trained)
        optimizer_before = self._optimizer_sha256 or tensors_sha256(_optimizer_part(before))
        # The gradients exactly as AdamW is about to use them; a parameter without one contributes zeros,
        # so every value keeps its position in the sketch.
        grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in trained.items()}
        if reduce is not None:
            local_sketch = gradient_sketch(grads, self.sketch_seed)  # of this node's own gradient
            grads = unflatten_gradient(reduce(flatten_gradient(grads)), grads)
            for name, param in trained.items():
                param.grad = grads[name].to(param.device, param.dtype)
        sketch = gradient_sketch(sketched_gradient(self.dishonest, grads), self.sketch_seed)
        if reduce is None:  # without replicas the node's own gradient is the one AdamW uses
            local_sketch = sketch
        pending = self.pending.pop(step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        after_update(self.dishonest, trained)
        after = _training_state(trained, self.optimizer)
        self._weights_sha256 = _weights_sha256(trained)
        self._optimizer_sha256 = tensors_sha256(_optimizer_part(after))
        self.last_step_state = StepState(step, before, after)
        for key in [key for key in self.activations if key[0] <= step]:
            del self.activations[key]
        for key in [key for key in self.pending if key <= step]:
            del self.pending[key]
        self.finished_backward.clear()
        self.last_applied_step = step
        self.weights_version += 1
        # the micro-batches whose gradients this step holds, in the order they were added up
        return StepWork(step, {micro: pending.inputs[micro] for micro in pending.accumulated},
                        sum(pending.tokens[micro] for micro in pending.accumulated),
                        pending.seconds + time.perf_counter() - started, weights_before, self._weights_sha256,
                        optimizer_before, self._optimizer_sha256, sketch, local_sketch)

    def step_state(self, step: int) -> StepState:
        """The state around `step`, which must be the last applied step (older states are not kept)."""
        if self.last_step_state is None or self.last_step_state.step != step:
            held = "none" if self.last_step_state is None else f"step {self.last_step_state.step}"
            raise ValueError(f"this node holds the state around its last applied step only ({held}), not step {step}")
        return self.last_step_state

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters this phase trains, under the names they are exported with."""
        return self._base_parameters() if self.phase_kind == "pretrain" else adapter_state(self.blocks)

    def _base_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The blocks' base parameters under checkpoint names (LoRA wraps `q_proj` as `q_proj.base_layer`)."""
        return base_parameters(self.blocks)

    def restore(self, phase_name: str, tensors: list[torch.Tensor]) -> None:
        """Take the weights a resumed coordinator sends, as they stood at the end of its last finished phase
        `phase_name` ("" for none): base tensors (checkpoint names) and LoRA tensors (PEFT names), sorted
        together by name (the two never share one). The work since is dropped (kept activations, pending
        steps, optimizer state, the last applied step), so the interrupted phase's `configure_phase` merges,
        renews or continues as it first did, and its steps can be applied again."""
        own = {**self._base_parameters(), **adapter_state(self.blocks)}
        check_restore(own, tensors, self.block_range)
        with torch.no_grad():
            for name, tensor in zip(sorted(own), tensors):
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))
        self._enter_phase(phase_name, "sft", last_applied_step=-1)  # as a fresh node given these weights

    def replica_state(self) -> dict[str, torch.Tensor]:
        """Everything a new replica of this range needs to continue exactly where this one stands: every
        parameter (`param/NAME`: base under checkpoint names, LoRA under PEFT names) and the AdamW moments of
        what the phase trains (`exp_avg/NAME`, `exp_avg_sq/NAME`, `step/NAME`)."""
        own = {**self._base_parameters(), **adapter_state(self.blocks)}
        state = {f"param/{name}": param.detach().float().cpu().clone() for name, param in own.items()}
        moments = _optimizer_part(_training_state(self._trained_parameters(), self.optimizer))
        return {**state, **moments}

    def load_replica_state(self, phase_name: str, kind: str, last_step: int, tensors: dict[str, torch.Tensor]
                           ) -> tuple[str, str]:
        """Become a copy of the replica whose `replica_state` this is, in phase `phase_name` (of `kind`) after
        step `last_step`; returns the hashes of the trained weights and the AdamW state, for the trainer to
        compare with the source's."""
        own = {**self._base_parameters(), **adapter_state(self.blocks)}
        check_replica_state(own, kind, tensors, self.block_range)  # all checked before anything changes
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(tensors[f"param/{name}"].to(param.device, param.dtype))
        self._enter_phase(phase_name, kind, last_applied_step=last_step)
        for name, param in self._trained_parameters().items():
            load_adam_state(self.optimizer, param, name, tensors)  # none saved: no step yet, like the source
        self._weights_sha256, self._optimizer_sha256 = self.state_hashes()
        return self._weights_sha256, self._optimizer_sha256

    def state_hashes(self) -> tuple[str, str]:
        """SHA-256 of the trained weights and of the AdamW state, as attestations state them."""
        trained = self._trained_parameters()
        return _weights_sha256(trained), tensors_sha256(_optimizer_part(_training_state(trained, self.optimizer)))

    def configure_phase(self, name: str, kind: str, adapter_action: str, lora_seed: str) -> None:
        """Start a phase: pretrain trains the base weights; LoRA phases continue, merge-and-renew or renew
        the adapter. Each phase starts with fresh optimizer state and no kept activations. Repeating the
        call for the current phase changes nothing (a retried call must not merge twice)."""
        if name == self.phase_name:
            return
        self._enter_phase(name, kind, last_applied_step=self.last_applied_step)  # step ids run on across phases
        if kind != "pretrain" and adapter_action == "merge":
            merge_lora(self.blocks)
        if kind != "pretrain" and adapter_action in ("merge", "new"):
            init_lora_weights(self.blocks, lora_seed)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The blocks' base tensors under their checkpoint names (after pretraining or merges)."""
        return {name: param.detach().float().cpu() for name, param in self._base_parameters().items()}

    def adapter(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().float().cpu() for key, value in adapter_state(self.blocks).items()}


def _training_state(trained: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
                    ) -> dict[str, torch.Tensor]:
    """Trained weights and their AdamW state as float32 CPU copies, named `weights/NAME`,
    `exp_avg/NAME`, `exp_avg_sq/NAME`, `step/NAME` (the moments exist from the first step on)."""
    state = {f"{WEIGHTS_PREFIX}{name}": param.detach().float().cpu().clone() for name, param in trained.items()}
    for name, param in trained.items():
        for key, value in optimizer.state.get(param, {}).items():
            state[f"{key}/{name}"] = value.detach().float().cpu().clone().reshape(value.shape)
    return state


def _weights_sha256(parameters: dict[str, torch.nn.Parameter]) -> str:
    return tensors_sha256({name: param.detach().float() for name, param in parameters.items()})


def _optimizer_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.startswith(WEIGHTS_PREFIX)}
