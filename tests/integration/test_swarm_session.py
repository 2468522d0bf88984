"""The coordinator's session driven in-process against real node processes."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from coordinator.trainer import swarm_logits, train_step
from swarm.lora import save_peft_adapter
from tests.conftest import write_job
from tests.integration.helpers import local_session


def test_exported_adapter_gives_the_swarms_logits_in_plain_peft(tmp_path):
    job_file = write_job(tmp_path, training={"steps": 3, "batch_size": 4, "micro_batches": 1},
                         swarm={"min_nodes": 2})
    run_dir = tmp_path / "run"
    with local_session(job_file, run_dir, nodes=2) as (prepared, session):
        chain = session.chain
        batch = prepared.data.batch(100)
        assert [(stage.start, stage.end) for stage in chain.stages] == [(0, 3), (3, 6)]
        before = swarm_logits(chain, session.head, batch.input_ids, batch.attention_mask)
        for step in range(3):
            train_step(chain, session.head, prepared.data.batch(step), step, 0.01, micro_batches=1)
        after = swarm_logits(chain, session.head, batch.input_ids, batch.attention_mask)
        save_peft_adapter(run_dir / "adapter", chain.gather_adapter(), prepared.job.lora, str(prepared.checkpoint.path))
    base = AutoModelForCausalLM.from_pretrained(prepared.checkpoint.path)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        base_logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert (before - base_logits)[real].abs().max() <= 1e-5  # B = 0: untrained adapters change nothing
        plain = PeftModel.from_pretrained(base, run_dir / "adapter")
        peft_logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (after - before)[real].abs().max() > 1e-3
    assert (after - peft_logits)[real].abs().max() <= 1e-4
