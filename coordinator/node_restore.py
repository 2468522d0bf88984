"""Setting every node's blocks to a state rebuilt from files: a base model, the adapters merged into it, and the
adapter to continue (a resumed run's last finished phase, or a run's starting adapter, coordinator.start_adapter)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from coordinator.chain import RemoteChain
from swarm.config import Job
from swarm.lora import adapter_state, base_parameters, load_adapter_state, load_peft_adapter, lora_block_stack
from swarm.models.checkpoint import DTYPES, Checkpoint

logger = logging.getLogger("swarm.coordinator")


def restore_blocks(chain: RemoteChain, job: Job, base_dir: str, merged: list[str], adapter_dir: Path | None,
                   phase: str, what: str = "") -> None:
    """Send every node its range of `base_dir` with the adapters `merged` merged in order and `adapter_dir`'s
    LoRA tensors (the job's seeded fresh adapter when None), as the state at the end of phase `phase` ("": none);
    `what` names the state in the log (default: that phase's end).

    Each range is rebuilt here, one at a time, exactly as the node builds it (swarm.lora.lora_block_stack)."""
    base = Checkpoint.open(base_dir)
    adapter = load_peft_adapter(adapter_dir)[1] if adapter_dir is not None else None
    for stage in chain.stages:
        stack = lora_block_stack(base, stage.start, stage.end, job.lora, job.seed, DTYPES[job.model.dtype],
                                 [Path(path) for path in merged])
        if adapter is not None:
            load_adapter_state(stack, adapter)
        with torch.no_grad():
            tensors = {name: param.detach().float()
                       for name, param in {**base_parameters(stack), **adapter_state(stack)}.items()}
        chain.restore(stage, phase, tensors)
        logger.info("restored %s to %s", stage, what or f"the end of phase {phase or '(none)'}")
