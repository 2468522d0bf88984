"""A real job with `data.responses: self`: after its pretrain phase (on the built-in tasks) the swarm answers a
JSONL file's prompts, the answers are saved and audited, the LoRA phase's batches are made of them, and evaluation
asks only held-out prompts from then on."""

from __future__ import annotations

import hashlib
import json

from coordinator.run_dir import read_metrics
from swarm.audit.canonical import parse_json_object
from swarm.audit.log import AuditLog
from swarm.audit.snapshot import read_snapshot
from swarm.config import load_job
from swarm.data.batches import IGNORE_INDEX, TrainingData
from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
from swarm.data.tasks import is_held_out
from swarm.data.tokenizer import load_tokenizer
from swarm.models.checkpoint import resolve_model
from tests.conftest import write_job
from tests.integration.helpers import finish, swarm_audit

TOPICS = ("rain", "snow", "tea", "bread", "cats", "dogs", "maps", "ships", "kites", "bees", "owls", "jazz")
PROMPTS = [f"Name a thing about {topic}." for topic in TOPICS]  # rain, tea and jazz fall in the held-out part
STEPS, SELF_TOKENS = 3, 6


def test_a_job_trains_on_the_models_own_answers_and_evaluates_on_held_out_prompts(tmp_path, processes):
    held = {p for p in PROMPTS if is_held_out(p)}
    assert len(held) == 3
    data_file = tmp_path / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))  # no responses
    job_file = write_job(tmp_path, data={"source": "jsonl", "path": str(data_file), "responses": "self",
                                         "self_max_new_tokens": SELF_TOKENS, "max_length": 64},
                         training={"steps": None, "batch_size": 4, "micro_batches": 2},
                         # a pretrain phase that hardly moves the random model: at lr 0.01 it learns to end every
                         # answer at once, and a model without answers leaves nothing to train on (an error)
                         phases=[{"kind": "pretrain", "steps": 2, "lr": 1e-5}, {"kind": "sft", "steps": STEPS}],
                         eval={"samples": 4, "max_new_tokens": 4, "batch_size": 16},
                         audit={"snapshots_per_phase": STEPS})
    run_dir = tmp_path / "run"
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--run-dir",
                            str(run_dir), "--node-threads", "1", "--no-progress", "--no-baseline")
    code, output = finish(coordinator, timeout=300)
    assert code == 0, output
    assert "self responses: 9 train prompts answered" in output

    saved = [json.loads(line) for line in (run_dir / SELF_RESPONSES_FILE).read_text().splitlines()]
    train = {r["prompt"]: r["response"] for r in saved if r["split"] == "train"}
    assert set(train) <= set(PROMPTS) - held and train
    assert {r["prompt"] for r in saved if r["split"] == "held_out"} <= held
    assert all(r["response"].strip() and len(r["response"]) <= SELF_TOKENS for r in saved)

    with AuditLog.open(run_dir / "audit.db") as log:
        files = [parse_json_object(e.payload) for e in log.entries() if e.kind == "checkpoint"]
    recorded = [f for f in files if f["path"] == SELF_RESPONSES_FILE]
    assert [f["sha256"] for f in recorded] == [hashlib.sha256((run_dir / SELF_RESPONSES_FILE).read_bytes()).hexdigest()]
    assert recorded[0]["phase"] == "sft"  # made after the pretrain phase, before the LoRA phase

    # Every step was snapshotted: what the nodes trained on is the job's data made of the saved answers.
    job = load_job(job_file)
    tokenizer = load_tokenizer(resolve_model(job.model), job.data.chat_format)
    phase = job.phase_list[1]
    data = TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor,
                        read_self_responses(run_dir / SELF_RESPONSES_FILE, "jsonl"))
    snapshots = [read_snapshot(run_dir / f["path"]) for f in files if "replay_step" in f and f["phase"] == "sft"]
    assert sorted(s.phase_step for s in snapshots) == list(range(STEPS))
    for snapshot in snapshots:
        assert data.batch(snapshot.phase_step).input_ids.equal(snapshot.batch.input_ids)
        for labels in snapshot.batch.labels:
            assert tokenizer.decode([int(t) for t in labels if t != IGNORE_INDEX]) in train.values()

    evaluations = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["phase"] for r in evaluations] == ["start", "pretrain", "sft"]
    # the last evaluation asks each held-out record once (those the model answered; the first two ask the tasks)
    answered = [r for r in saved if r["split"] == "held_out"]
    assert [row["accuracy"]["n"] for row in evaluations] == [4, 4, len(answered)]
    assert evaluations[2]["eval_prompts"]["clean"] == evaluations[2]["eval_prompts_available"]["clean"] == len(answered)
    assert not {sample["prompt"] for row in evaluations[:2] for sample in row["samples"]["clean"]} & set(PROMPTS)
    assert {sample["prompt"] for sample in evaluations[2]["samples"]["clean"]} <= held

    # An overseer's replay rebuilds each snapshotted batch from the audited answers, and finds nothing.
    replayed = swarm_audit("replay", run_dir, "--sample", "1")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
