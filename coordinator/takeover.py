"""Step checkpoints inside a phase, and taking a range over when it lost its last replica: another node gets the
range (the session's `recover`), every range goes back to the latest step checkpoint, and the steps after it are
redone. The metrics log is rewound to the checkpoint and the rollback is an audit event.
"""

from __future__ import annotations

import logging
import time

import torch

from coordinator.chain import RangeLostError
from coordinator.phase_context import PhaseContext, audit_event, record_file
from coordinator.run_dir import done_before
from coordinator.step_checkpoint import StepCheckpoint, head_state, load_head_state, write_step_checkpoint
from swarm.config import PhaseSpec

logger = logging.getLogger("swarm.coordinator")

TAKE_OVER_ATTEMPTS = 3  # ranges lost again while rolling back, before the job gives up


def checkpoint_states(context: PhaseContext, checkpoint: StepCheckpoint
                      ) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The checkpoint's state of each range the chain serves now."""
    return checkpoint.range_states(context.chain.ranges, context.checkpoint.family.layers_prefix)


def has_checkpoint(context: PhaseContext, phase_index: int) -> bool:
    """Whether the latest step checkpoint is of this very point (just rolled back to, or resumed from)."""
    latest = context.progress.last_checkpoint
    return latest is not None and (latest.phase_index, latest.step) == (phase_index, context.progress.step)


def write_checkpoint(context: PhaseContext, phase: PhaseSpec, phase_index: int, phase_step: int,
                     head_optimizer) -> None:
    """A step checkpoint before step `phase_step` of the phase (coordinator.step_checkpoint), in the audit log."""
    started = time.perf_counter()
    checkpoint = write_step_checkpoint(
        context.run_dir, phase_index=phase_index, phase=phase.name, phase_kind=phase.kind, phase_step=phase_step,
        step=context.progress.step, safety_step=context.progress.safety_step, ranges=context.chain.gather_replica_states(),
        head=head_state(context.head, head_optimizer) if head_optimizer is not None else None)
    for name in sorted(checkpoint.files):
        record_file(context, checkpoint.path / name, phase=phase.name, step_checkpoint=checkpoint.step)
    context.progress.last_checkpoint = checkpoint
    size = sum((checkpoint.path / name).stat().st_size for name in checkpoint.files)
    logger.info("step checkpoint before step %d: %.1f MB in %.2f s", checkpoint.step, size / 1e6,
                time.perf_counter() - started)


def take_over(context: PhaseContext, phase: PhaseSpec, phase_index: int, error: RangeLostError,
              head_optimizer) -> int:
    """A range lost its last replica: another node takes it over (`context.swarm.recover`, which waits for one),
    every range goes back to the latest step checkpoint, and the phase goes on from there; returns the
    phase step to go on from. Without a checkpoint of this phase, or a way to recover, the error stands."""
    checkpoint = context.progress.last_checkpoint
    if context.swarm is None or checkpoint is None or checkpoint.phase_index != phase_index:
        raise error
    for attempt in range(1, TAKE_OVER_ATTEMPTS + 1):
        logger.warning("%s; taking the range over from the checkpoint before step %d", error, checkpoint.step)
        context.swarm.recover(error)
        try:
            context.chain.load_state(phase.name, phase.kind, checkpoint.last_step,
                                     checkpoint_states(context, checkpoint),
                                     str(checkpoint.path.relative_to(context.run_dir)))
            break
        except RangeLostError as again:  # another range went while rolling back
            if attempt == TAKE_OVER_ATTEMPTS:
                raise
            error = again
    if head_optimizer is not None:
        load_head_state(context.head, head_optimizer, checkpoint.head_state())
    redone = context.progress.step - checkpoint.step
    audit_event(context, "rollback", from_step=checkpoint.step, phase=phase.name, phase_step=checkpoint.phase_step,
                reason=str(error), redone_steps=redone)
    context.metrics.rewind(done_before(checkpoint.step))
    context.progress.step, context.progress.safety_step = checkpoint.step, checkpoint.safety_step
    logger.warning("rolled every range back to the checkpoint before step %d; %d steps are redone",
                   checkpoint.step, redone)
    return checkpoint.phase_step
