"""Single-process peft LoRA training on the whole model: the baseline the swarm must match (and, with `full`,
full-parameter training as a `pretrain` phase does it).

Same checkpoint, same seeded adapter initialisation, same batches, same loss and optimizer as the swarm;
tests compare trajectories with it and bench/ compares step times with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarm.config import Job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import load_tokenizer
from swarm.lora import ADAPTER_NAME, adapter_state, compute_lora, init_lora_weights, peft_config
from swarm.models.checkpoint import DTYPES
from swarm.training import learning_rate, make_optimizer, summed_lm_loss


@dataclass
class ReferenceRun:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)


def load_peft_model(checkpoint_dir: Path, job: Job):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint_dir), dtype=DTYPES[job.model.dtype], attn_implementation="sdpa"
    )
    model = get_peft_model(model, peft_config(job.lora, str(checkpoint_dir)), adapter_name=ADAPTER_NAME)
    init_lora_weights(model.base_model.model, job.seed)
    return model


def train_reference(checkpoint_dir: Path, job: Job, steps: int | None = None, records=None,
                    full: bool = False) -> ReferenceRun:
    """`records`: the examples a data.responses self run trained on (swarm.data.instructions.read_self_responses).
    `full`: train every base weight with the adapter frozen and skipped, as nodes run a `pretrain` phase (its
    B = 0 adds exact zeros); otherwise the adapter, the base frozen."""
    phase = job.phase_list[0]
    steps = phase.steps if steps is None else steps
    model = load_peft_model(checkpoint_dir, job)
    model.train()
    if full:
        compute_lora(model, enabled=False)
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" not in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, job.optimizer)
    data = TrainingData(job.data, load_tokenizer(checkpoint_dir, job.data.chat_format), job.seed, phase.batch_size,
                        records=records)
    run = ReferenceRun()
    for step in range(steps):
        started = time.perf_counter()
        batch = data.batch(step)
        targets = batch.target_tokens
        total = 0.0
        for micro in batch.split(job.training.micro_batches):
            logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
            loss = summed_lm_loss(logits, micro.labels) / targets
            loss.backward()
            total += loss.item()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(job.optimizer, step, phase.steps, phase.lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.losses.append(total)
        run.step_seconds.append(time.perf_counter() - started)
    run.adapter = {k: v.detach().clone() for k, v in adapter_state(model.base_model.model).items()}
    return run
