"""Every supported family trains through a real swarm exactly as single-process peft trains it.

Each case is a short LoRA job on a micro preset: two node processes serve the blocks over hivemind, the
coordinator's trainer embeds (adding GPT-2's learned positions), computes the loss and steps; the losses
and the gathered adapter must equal `train_reference` on the same checkpoint within 1e-4.
"""

from __future__ import annotations

import pytest

from coordinator.trainer import train_step
from swarm.models.families import FAMILIES
from swarm.models.presets import PRESETS
from swarm.reference import train_reference
from swarm.training import learning_rate
from tests.conftest import write_job
from tests.integration.helpers import local_session

STEPS = 3
MICRO_PRESETS = sorted(name for name, preset in PRESETS.items() if name.endswith("-micro"))


def test_every_family_is_covered():
    assert sorted(PRESETS[name].family for name in MICRO_PRESETS) == sorted(FAMILIES)


@pytest.mark.parametrize("preset", MICRO_PRESETS)
def test_swarm_training_equals_single_process_peft_for_the_family(tmp_path, preset):
    job_file = write_job(tmp_path, model={"preset": preset}, lora={"r": 4, "alpha": 8},
                         training={"steps": STEPS, "batch_size": 4, "micro_batches": 2}, swarm={"min_nodes": 2})
    with local_session(job_file, tmp_path / "run", nodes=2) as (prepared, session):
        job, phase = prepared.job, prepared.job.phase_list[0]
        losses = []
        for step in range(STEPS):
            lr = learning_rate(job.optimizer, step, phase.steps, phase.lr)
            losses.append(train_step(session.chain, session.head, prepared.data.batch(step), step, lr,
                                     job.training.micro_batches).loss)
        adapter = session.chain.gather_adapter()
    reference = train_reference(prepared.checkpoint.path, job)
    assert max(abs(a - b) for a, b in zip(losses, reference.losses)) <= 1e-4
    assert losses[-1] != losses[0]  # it trained
    assert set(adapter) == set(reference.adapter)
    worst = max((adapter[key] - reference.adapter[key]).abs().max().item() for key in adapter)
    assert worst <= 1e-4
    moved = max(reference.adapter[key].abs().max().item() for key in reference.adapter if "lora_B" in key)
    assert moved > 1e-3  # B started at zero: the comparison is not between two untouched adapters
