"""swarm.reference's full-parameter training (the one-machine baseline of a `pretrain` phase): peft's model with
its zero adapter skipped trains exactly as the plain transformers model does with every weight trained."""

from __future__ import annotations

import pytest
import torch

from swarm.config.loading import parse_job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import load_tokenizer
from swarm.models.presets import materialize_preset
from swarm.reference import train_reference
from swarm.training import learning_rate, make_optimizer, summed_lm_loss

STEPS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return materialize_preset("llama-micro", seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _plain_full_losses(model_dir, job) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    optimizer = make_optimizer(list(model.parameters()), job.optimizer)
    phase = job.phase_list[0]
    data = TrainingData(job.data, load_tokenizer(model_dir, job.data.chat_format), job.seed, phase.batch_size)
    losses = []
    for step in range(STEPS):
        batch = data.batch(step)
        loss = summed_lm_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                              batch.labels) / batch.target_tokens
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(job.optimizer, step, phase.steps, phase.lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_full_reference_training_is_plain_full_parameter_training(model_dir):
    job = parse_job({"name": "ref", "model": {"preset": "llama-micro"}, "optimizer": {"lr": 0.01},
                     "training": {"batch_size": 4}, "phases": [{"kind": "pretrain", "steps": STEPS}]})
    full = train_reference(model_dir, job, steps=STEPS, full=True)
    lora = train_reference(model_dir, job, steps=STEPS)
    plain = _plain_full_losses(model_dir, job)
    assert full.losses == pytest.approx(plain, abs=1e-5)
    assert full.losses[0] == pytest.approx(lora.losses[0], abs=1e-6)  # same model before any step
    assert abs(full.losses[-1] - lora.losses[-1]) > 1e-3  # but other weights trained
    assert all(torch.equal(value, torch.zeros_like(value)) for name, value in full.adapter.items()
               if "lora_B" in name)  # the adapter stayed frozen at B = 0
