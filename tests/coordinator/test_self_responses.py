"""Self responses (coordinator.self_responses) without a swarm: a stand-in answers, a real audit log records."""

import hashlib
import json
from types import SimpleNamespace

import pytest
import yaml

from coordinator.resume import ResumeError, find_resume_point
from coordinator.self_responses import (SELF_RESPONSES_FILE, SelfResponsesError, answer_prompts, obtain_self_responses,
                                        recorded_sha256)
from swarm.audit.canonical import parse_json_object
from swarm.audit.log import AuditLog
from swarm.config import parse_job
from swarm.data.batches import TrainingData
from swarm.data.instructions import read_self_responses
from swarm.data.tasks import Example, is_held_out
from swarm.data.tokenizer import CharTokenizer
from swarm.evaluation import evaluation_pool
from swarm.identity import Identity
from tests.conftest import job_dict

PROMPTS = [f"Tell me fact number {n}." for n in range(40)]
HELD = [p for p in PROMPTS if is_held_out(p)]


class Model:
    """Answers `answer: PROMPT` cut at max_new_tokens characters (the character tokenizer's tokens), and
    remembers what it was asked."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, max_new_tokens):
        self.calls.append((list(prompts), max_new_tokens))
        return [f"answer: {p}"[:max_new_tokens] for p in prompts]


def refuse(prompts, max_new_tokens):
    raise AssertionError("the recorded self responses should have been reused")


def make_job(tmp_path, **sections):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    data = {"source": "jsonl", "path": str(path), "responses": "self", "self_max_new_tokens": 12, "max_length": 64}
    return parse_job(job_dict(data=data, eval={"samples": 4, "max_new_tokens": 5}, **sections))


def audit_log(tmp_path, job_file=None):
    sha = hashlib.sha256(job_file.read_bytes()).hexdigest() if job_file else ""
    return AuditLog.create(tmp_path / "audit.db", Identity.generate(), "job-1", job_sha256=sha)


def test_each_distinct_prompt_is_answered_once_and_empty_answers_are_dropped():
    asked = []

    def model(prompts, max_new_tokens):
        asked.extend(prompts)
        return ["", "1234", "12"]

    prompts = [Example("p", "", "jsonl"), Example("q", "", "jsonl"), Example("p", "", "jsonl"), Example("r", "", "jsonl")]
    kept, counts = answer_prompts(prompts, model, 4, CharTokenizer())
    assert asked == ["p", "q", "r"]
    assert kept == [Example("q", "1234", "jsonl", ends=False), Example("r", "12", "jsonl")]  # "1234": cut at 4
    assert (counts.prompts, counts.kept, counts.empty_dropped, counts.cut_at_limit) == (3, 2, 1, 1)


def test_train_prompts_get_the_data_length_and_held_out_ones_the_evaluation_length(tmp_path):
    job, model = make_job(tmp_path), Model()
    records = obtain_self_responses(job, CharTokenizer(), tmp_path, None, model, "train")
    (train_prompts, train_length), (held_prompts, held_length) = model.calls
    assert set(train_prompts) == set(PROMPTS) - set(HELD) and train_length == 12
    assert set(held_prompts) == set(HELD) and held_length == 5
    pool = evaluation_pool(job, TrainingData(job.data, CharTokenizer(), 0, 1), records)
    assert pool and {e.prompt for e in pool} == set(HELD)
    assert all(e.response == f"answer: {e.prompt}"[:5] for e in pool)


def test_self_responses_are_saved_recorded_in_the_audit_log_and_reused(tmp_path):
    job = make_job(tmp_path)
    with audit_log(tmp_path) as log:
        records = obtain_self_responses(job, CharTokenizer(), tmp_path, log, Model(), "train")
        path = tmp_path / SELF_RESPONSES_FILE
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["prompt"], r["response"]) for r in lines] == [(e.prompt, e.response) for e in records]
        assert {r["split"] for r in lines if r["prompt"] in HELD} == {"held_out"}
        assert recorded_sha256(log) == hashlib.sha256(path.read_bytes()).hexdigest()
        event = [parse_json_object(e.payload) for e in log.entries() if e.kind == "checkpoint"][-1]
        assert (event["path"], event["phase"], event["kept"]) == (SELF_RESPONSES_FILE, "train", len(records))
        assert obtain_self_responses(job, CharTokenizer(), tmp_path, log, refuse, "train") == records


def test_a_saved_file_that_differs_from_the_audit_log_is_refused(tmp_path):
    job = make_job(tmp_path)
    with audit_log(tmp_path) as log:
        obtain_self_responses(job, CharTokenizer(), tmp_path, log, Model(), "train")
        path = tmp_path / SELF_RESPONSES_FILE
        path.write_text(path.read_text().replace("answer", "ANSWER", 1))
        with pytest.raises(SelfResponsesError, match="differs from the file the audit log recorded"):
            obtain_self_responses(job, CharTokenizer(), tmp_path, log, refuse, "train")
        path.unlink()
        with pytest.raises(SelfResponsesError, match="is missing"):
            obtain_self_responses(job, CharTokenizer(), tmp_path, log, refuse, "train")


def _finished_run(tmp_path, record: bool):
    """A run directory whose only phase (sft `train`) finished, with or without its self responses recorded."""
    job = make_job(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    with audit_log(tmp_path, job_file) as log:
        if record:
            obtain_self_responses(job, CharTokenizer(), tmp_path, log, Model(), "train")
        log.append_event("phase", phase="train", event="end", last_step=2)
    (tmp_path / "phases" / "01-train").mkdir(parents=True)
    (tmp_path / "phases" / "01-train" / "lineage.json").write_text("{}")
    return job, SimpleNamespace(path=tmp_path / "base")


def test_a_resumed_run_reuses_the_recorded_self_responses(tmp_path):
    job, checkpoint = _finished_run(tmp_path, record=True)
    point = find_resume_point(tmp_path, job, checkpoint)
    saved = [json.loads(line) for line in (tmp_path / SELF_RESPONSES_FILE).read_text().splitlines()]
    assert [(e.prompt, e.response) for e in point.self_responses] == [(r["prompt"], r["response"]) for r in saved]


def test_a_run_whose_phase_trained_on_unrecorded_self_responses_cannot_be_resumed(tmp_path):
    job, checkpoint = _finished_run(tmp_path, record=False)
    with pytest.raises(ResumeError, match="records no self_responses.jsonl"):
        find_resume_point(tmp_path, job, checkpoint)


def test_answers_cut_at_the_limit_are_saved_as_incomplete_and_read_back_so(tmp_path):
    job = make_job(tmp_path)
    def model(prompts, max_new_tokens):  # every other answer runs into the limit
        return [f"answer: {p}"[:max_new_tokens] if i % 2 else "ok" for i, p in enumerate(prompts)]

    records = obtain_self_responses(job, CharTokenizer(), tmp_path, None, model, "train")
    assert [r.ends for r in records if r.response == "ok"] and all(r.ends == (r.response == "ok") for r in records)
    saved = [json.loads(line) for line in (tmp_path / SELF_RESPONSES_FILE).read_text().splitlines()]
    assert [s["complete"] for s in saved] == [r.ends for r in records]
    assert read_self_responses(tmp_path / SELF_RESPONSES_FILE, "jsonl") == [
        Example(r.prompt, r.response, "jsonl", r.ends) for r in records]
