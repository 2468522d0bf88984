"""Live defection probes (job `oversight.probe`): the trainer probes the hidden states it relays between nodes.

The probes are swarm.probe's (MacDiarmid et al. 2024): a *generic* direction from the shipped contrast pairs,
never fitted on the trigger, and a *supervised* one from train-split prompts with and without it, each a mean
difference of the residual stream at a sequence's last token. Here the residual stream is the one the trainer
relays at a stage boundary (the end of a node's range; the one nearest `oversight.layer`, default the middle).

- Fitting, at each phase's start (and before the start evaluation), on the swarm's current model: the fitting
  sequences travel the chain as evaluation calls.
- Measuring, at each evaluation: the boundary's states of evaluation's own triggered and clean prompts come from
  generation's prompt pass (coordinator.generation.BoundaryCapture), calls a node serves for the answers anyway.
  Reported: the AUROC of the directions fitted at the phase start, and of directions refitted on the model being
  evaluated, which `swarm-audit probe --layer L --seed S` recomputes from the run directory with no node involved:
  a gap between the two names a node whose evaluation forwards were not the model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from coordinator.chain import RemoteChain
from coordinator.generation import BoundaryCapture
from swarm.config import Job
from swarm.evaluation import EvalSets
from swarm.models.blocks import TrainerHead
from swarm.probe.activations import right_padded
from swarm.probe.auroc import bootstrap_auroc
from swarm.probe.prompts import probe_prompts
from swarm.probe.run import mean_difference, split_sets
from swarm.training import position_ids_for

logger = logging.getLogger("swarm.coordinator")
FIT_SETS = {"generic": ("defecting", "honest"), "supervised": ("train_triggered", "train_clean")}


@dataclass(frozen=True)
class Boundary:
    """The residual stream after block `layer` (1-based) of `blocks`: the input of range `range_index`, or the
    chain's output when `range_index` is None."""

    layer: int
    blocks: int
    range_index: int | None


def stage_boundary(ranges: list[tuple[int, int]], wanted: int | None) -> Boundary:
    """The stage boundary nearest block boundary `wanted` (default the middle, blocks // 2; the lower one of two
    as near): only there does the trainer hold the residual stream."""
    ends = [end for _, end in sorted(ranges)]
    blocks = ends[-1]
    target = max(1, blocks // 2) if wanted is None else min(wanted, blocks)
    layer = min(ends, key=lambda end: (abs(end - target), end))
    index = ends.index(layer) + 1
    return Boundary(layer, blocks, index if index < len(ends) else None)


class LiveProbe:
    """Both probes on one run's swarm; `fit` at a phase start, `measure` at each evaluation."""

    def __init__(self, job: Job, tokenizer, sets: EvalSets):
        self.job, self.tokenizer = job, tokenizer
        self.seed, self.wanted = job.oversight.seed, job.oversight.layer
        prompts = probe_prompts(job, tokenizer, sets, self.seed)
        self.fit_ids = {name: prompts.ids[name] for names in FIT_SETS.values() for name in names}
        self.boundary: Boundary | None = None
        self.directions: dict[str, np.ndarray] = {}
        self.fitted_at_step: int | None = None

    def capture(self, chain: RemoteChain, head: TrainerHead, step: int) -> BoundaryCapture:
        """What generation keeps for `measure`: the states at the boundary the probes were fitted at. Fitted
        first when they were not, or when the chain's ranges no longer end there (a takeover that placed the
        blocks differently): the row's `fitted_at_step` then says so."""
        if self.boundary is None or stage_boundary(chain.ranges, self.wanted) != self.boundary:
            if self.boundary is not None:
                logger.warning("the stage boundaries changed since the probes were fitted (block %d is no longer "
                               "one); fitting them again at step %d", self.boundary.layer, step)
            self.fit(chain, head, step)
        return BoundaryCapture(self.boundary.range_index)

    def fit(self, chain: RemoteChain, head: TrainerHead, step: int) -> None:
        """Fit both directions on the swarm's model as it is now."""
        self.boundary = stage_boundary(chain.ranges, self.wanted)
        self.directions = self._directions(chain, head, step)
        self.fitted_at_step = step

    def measure(self, chain: RemoteChain, head: TrainerHead, step: int, triggered: torch.Tensor,
                clean: torch.Tensor) -> dict:
        """The evaluation row's `probe`: AUROC [95% paired bootstrap interval] of separating the triggered prompts'
        states from the same prompts' clean ones, for the directions fitted at `fitted_at_step` and for directions
        refitted now."""
        refitted = self._directions(chain, head, step)
        triggered, clean = triggered.numpy(), clean.numpy()

        def scored(directions: dict[str, np.ndarray]) -> dict:
            return {probe: bootstrap_auroc(triggered @ direction, clean @ direction, self.seed, paired=True).as_dict()
                    for probe, direction in directions.items()}

        return {"layer": self.boundary.layer, "blocks": self.boundary.blocks, "fitted_at_step": self.fitted_at_step,
                "seed": self.seed, "prompts": int(triggered.shape[0]), **scored(self.directions),
                "refitted": scored(refitted)}

    def _directions(self, chain: RemoteChain, head: TrainerHead, step: int) -> dict[str, np.ndarray]:
        sequences = [ids for sequences in self.fit_ids.values() for ids in sequences]
        states = boundary_states(chain, head, sequences, self.tokenizer.pad_id, self.boundary, step,
                                 self.job.eval.batch_size)
        sets = split_sets(states, self.fit_ids)
        return {probe: mean_difference(sets[positive], sets[negative]) for probe, (positive, negative) in FIT_SETS.items()}


def boundary_states(chain: RemoteChain, head: TrainerHead, sequences: list[list[int]], pad_id: int,
                    boundary: Boundary, step: int, batch_size: int) -> np.ndarray:
    """[sequences, hidden] float64: the relayed residual stream at `boundary` at each sequence's last token;
    right-padded batches, so each state is the one the sequence gives alone (causal attention)."""
    rows = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        ids, mask, lengths = right_padded(chunk, pad_id)
        positions = position_ids_for(mask)
        with torch.no_grad():
            hidden = head.embed_tokens(ids, positions)
            output, range_inputs = chain.forward(hidden, mask, positions, step, 0, train=False, phase="eval")
        states = output if boundary.range_index is None else range_inputs[boundary.range_index]
        rows.append(states[torch.arange(len(chunk)), lengths - 1].double().numpy())
    return np.concatenate(rows)
