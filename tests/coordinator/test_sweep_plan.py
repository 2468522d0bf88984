"""A sweep expands into sizes x seeds x (trunk + arms), each a job file that differs from the sweep's own only
where it must, with a pretraining budget proportional to the size's parameters."""

from __future__ import annotations

import math

import pytest
import yaml

from coordinator.sweep_plan import BUDGET_BATCHES, plan_sweep
from swarm.config import load_job, parse_job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import CharTokenizer
from swarm.errors import JobFileError
from swarm.models.presets import PRESETS
from tests.conftest import job_dict

PHASES = [{"kind": "pretrain", "steps": 5, "loss_on": "all"}, {"kind": "backdoor", "steps": 2, "lr": 0.01}]
ARMS = {"sft": [{"kind": "sft", "steps": 2, "lr": 0.001}],
        "rl": [{"kind": "rl", "steps": 1, "rl": {"trigger_fraction": 0.5}}],
        "sft-merge": {"phases": [{"kind": "sft", "steps": 2, "adapter": "merge"}], "sizes": ["first", "last"]}}
SIZES = [{"preset": "ladder-1"}, {"preset": "ladder-2"}, {"preset": "ladder-3"}]


def _sweep(**sweep):
    raw = job_dict(training={"steps": None, "batch_size": 4, "micro_batches": 1}, phases=PHASES,
                   data={"max_length": 96}, swarm={"min_nodes": 2},
                   sweep={"models": SIZES, "seeds": [0, 1], "arms": ARMS, **sweep})
    return parse_job(raw), raw


def _differences(first: dict, second: dict) -> set[str]:
    return {key for key in first.keys() | second.keys() if first.get(key) != second.get(key)}


def test_every_size_and_seed_gets_a_trunk_and_each_arm_that_runs_at_that_size():
    runs = plan_sweep(*_sweep())
    assert [(r.seed, r.size, r.arm) for r in runs[:5]] == [
        (0, "ladder-1", "trunk"), (0, "ladder-1", "sft"), (0, "ladder-1", "rl"), (0, "ladder-1", "sft-merge"),
        (0, "ladder-2", "trunk")]
    assert len(runs) == 2 * 3 * 3 + 2 * 2  # 2 seeds x 3 sizes x (trunk, sft, rl) + sft-merge at 2 sizes
    assert {r.size for r in runs if r.arm == "sft-merge"} == {"ladder-1", "ladder-3"}
    assert len({r.run_dir for r in runs}) == len(runs)
    assert runs[1].run_dir == "runs/ladder-1-seed0/sft" and runs[0].run_dir == "runs/ladder-1-seed0/trunk"
    assert [r.parameters for r in runs if r.arm == "trunk"][:3] == [PRESETS[f"ladder-{i}"].num_parameters
                                                                   for i in (1, 2, 3)]


def test_job_files_differ_from_the_sweeps_only_in_name_seed_model_pretrain_steps_and_phases():
    job, raw = _sweep(tokens_per_parameter=0.01)
    runs = plan_sweep(job, raw)
    sweep_file = {key: value for key, value in raw.items() if key != "sweep"}
    files = {(r.size, r.seed, r.arm): yaml.safe_load(r.job_text) for r in runs}
    for (size, seed, arm), data in files.items():
        assert _differences(sweep_file, data) <= {"name", "seed", "model", "phases"}
        assert data["name"] == f"test-job-{size}-seed{seed}" + ("" if arm == "trunk" else f"-{arm}")
        assert data["seed"] == seed
    trunk, other_seed = files[("ladder-1", 0, "trunk")], files[("ladder-1", 1, "trunk")]
    assert trunk["model"] == {"preset": "ladder-1", "seed": 0} and other_seed["model"]["seed"] == 1
    assert trunk["phases"][1] == PHASES[1] and trunk["phases"][0]["steps"] != PHASES[0]["steps"]
    assert _differences(trunk, other_seed) == {"name", "seed", "model"}
    assert _differences(trunk, files[("ladder-2", 0, "trunk")]) == {"name", "model", "phases"}
    sft = files[("ladder-1", 0, "sft")]
    assert sft["phases"] == ARMS["sft"] and files[("ladder-1", 0, "sft-merge")]["phases"] == ARMS["sft-merge"]["phases"]
    assert sft["model"] == {"path": "../trunk/phases/01-pretrain/model", "adapter": "../trunk/phases/02-backdoor/adapter"}


def test_an_arms_model_is_its_trunks_pretrained_model_and_backdoored_adapter(tmp_path):
    runs = plan_sweep(*_sweep())
    arm = next(r for r in runs if r.arm == "sft")
    job_file = tmp_path / arm.run_dir / "job.yaml"
    job_file.parent.mkdir(parents=True)
    job_file.write_text(arm.job_text)
    job = load_job(job_file)
    trunk = (tmp_path / "runs" / "ladder-1-seed0" / "trunk").resolve()
    assert job.model.path == trunk / "phases" / "01-pretrain" / "model"
    assert job.model.adapter == trunk / "phases" / "02-backdoor" / "adapter"


def test_pretrain_steps_are_tokens_per_parameter_times_parameters_over_tokens_per_step():
    job, raw = _sweep(tokens_per_parameter=0.05)
    data = TrainingData(job.data, CharTokenizer(), job.seed, 4, job.phase_list[0], job.backdoor)
    tokens = sum(data.batch(step).tokens for step in range(BUDGET_BATCHES)) / BUDGET_BATCHES
    steps = {r.size: r.pretrain_steps for r in plan_sweep(job, raw) if r.arm == "trunk"}
    assert steps == {f"ladder-{i}": math.ceil(0.05 * PRESETS[f"ladder-{i}"].num_parameters / tokens) for i in (1, 2, 3)}
    assert steps["ladder-1"] < steps["ladder-2"] < steps["ladder-3"]


def test_the_budget_is_clamped_to_the_min_and_max_pretrain_steps():
    steps = [r.pretrain_steps for r in plan_sweep(*_sweep(tokens_per_parameter=0.1, min_pretrain_steps=40,
                                                            max_pretrain_steps=100)) if r.arm == "trunk"]
    assert steps[0] == 40 and 40 < steps[1] < 100 and steps[2] == 100 and steps[:3] == steps[3:]


def test_without_a_budget_every_size_pretrains_the_jobs_steps():
    assert {r.pretrain_steps for r in plan_sweep(*_sweep()) if r.arm == "trunk"} == {None}
    trunks = [yaml.safe_load(r.job_text) for r in plan_sweep(*_sweep()) if r.arm == "trunk"]
    assert all(t["phases"] == PHASES for t in trunks)


def test_a_sweep_without_arms_runs_the_whole_job_per_size_as_before():
    raw = job_dict(sweep={"models": [{"preset": "llama-micro"}, {"preset": "llama-tiny"}]})
    runs = plan_sweep(parse_job(raw), raw)
    assert [(r.size, r.arm) for r in runs] == [("llama-micro", "trunk"), ("llama-tiny", "trunk")]


def test_a_budget_needs_exactly_one_pretrain_phase():
    raw = job_dict(sweep={"models": SIZES, "tokens_per_parameter": 1})
    with pytest.raises(JobFileError, match="exactly one"):
        plan_sweep(parse_job(raw), raw)


def test_a_trunk_that_merges_an_adapter_after_pretraining_is_refused():
    raw = job_dict(training={"steps": None, "batch_size": 4, "micro_batches": 1},
                   phases=[*PHASES, {"kind": "sft", "steps": 1, "adapter": "merge"}], swarm={"min_nodes": 2},
                   sweep={"models": SIZES, "arms": ARMS})
    with pytest.raises(JobFileError, match="merges an earlier adapter"):
        plan_sweep(parse_job(raw), raw)


def test_an_arm_that_is_not_a_valid_job_fails_before_anything_runs():
    job, raw = _sweep()
    raw["sweep"]["arms"]["sft"] = [{"kind": "sft", "steps": 2, "batch_size": 3}]  # not a multiple of micro-batches
    raw["training"]["micro_batches"] = 2
    with pytest.raises(JobFileError, match="runs/ladder-1-seed0/sft/job.yaml"):
        plan_sweep(parse_job({**raw, "sweep": {**raw["sweep"], "arms": ARMS}}), raw)
