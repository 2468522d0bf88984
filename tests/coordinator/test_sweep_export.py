"""Exporting a sweep's results: the runs' records without weights, and a sweep.md the copy alone reproduces."""

from __future__ import annotations

import json

import pytest
import yaml

from coordinator.sweep import run_sweep
from coordinator.sweep_export import export_sweep
from coordinator.sweep_plan import PlannedRun
from coordinator.sweep_report import write_sweep_report
from swarm.errors import SwarmError
from tests.conftest import job_dict
from tests.coordinator.test_sweep_report import _arm, _spec, _sweep


def _sweep_dir(tmp_path):
    sweep_dir = tmp_path / "sweep"
    runs = _sweep(sweep_dir, [[16, 32], [48, 64]])
    _arm(sweep_dir / "late", (60, 60, 64))
    runs.append(_spec("s0", 10 ** 6, 2, "sft", "late", finished=False))
    weights = sweep_dir / "s0-0-trunk" / "phases" / "02-backdoor" / "adapter"
    weights.mkdir(parents=True)
    (weights / "adapter_model.safetensors").write_bytes(b"weights")
    (sweep_dir / "sweep.json").write_text(json.dumps(runs))
    sweep = {"models": [{"preset": "llama-micro"}], "arms": {"sft": [{"kind": "sft", "steps": 2}]},
             "implanted_min": 0.5}
    (sweep_dir / "job.yaml").write_text(yaml.safe_dump(job_dict(
        sweep=sweep, training={"steps": None, "batch_size": 4}, phases=[{"kind": "backdoor", "steps": 2}])))
    return sweep_dir, runs


def test_the_export_holds_the_finished_runs_records_and_reproduces_the_report(tmp_path):
    sweep_dir, runs = _sweep_dir(tmp_path)
    out = tmp_path / "export"
    report, finished, total = export_sweep(sweep_dir, out)
    assert (finished, total) == (8, 9)
    assert sorted(p.name for p in (out / "s0-0-trunk").iterdir()) == ["job.yaml", "metrics.jsonl"]  # no phases/
    assert not list(out.rglob("*.safetensors")) and not (out / "late").exists()
    assert json.loads((out / "sweep.json").read_text()) == runs
    assert "- sft s0 seed 2 (`late`): unfinished" in report.read_text()
    exported = report.read_text()
    assert exported == write_sweep_report(sweep_dir, runs, wall_seconds=sum(r["seconds"] for r in runs)).read_text()
    assert export_sweep(sweep_dir, out)[0].read_text() == exported  # again into the same export


def test_an_export_refuses_a_foreign_directory_and_a_non_sweep(tmp_path):
    sweep_dir, _ = _sweep_dir(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SwarmError, match="is not an earlier export"):
        export_sweep(sweep_dir, tmp_path / "other")
    with pytest.raises(SwarmError, match="not a sweep directory"):
        export_sweep(tmp_path / "other", tmp_path / "out")
    with pytest.raises(SwarmError, match="other than the sweep's own"):
        export_sweep(sweep_dir, sweep_dir)


def test_a_group_with_an_unfinished_arm_is_exported_unfinished_whole_and_a_copy_resumes_it(tmp_path):
    sweep_dir, runs = _sweep_dir(tmp_path)
    runs[-2]["finished"] = False  # s1 seed 1's sft arm: its trunk finished, its weights stay behind in an export
    (sweep_dir / "sweep.json").write_text(json.dumps(runs))
    out = tmp_path / "export"
    report, finished, total = export_sweep(sweep_dir, out)
    index = {(row["size"], row["seed"], row["arm"]): row["finished"] for row in json.loads((out / "sweep.json").read_text())}
    assert (index[("s1", 1, "trunk")], index[("s1", 1, "sft")], index[("s1", 0, "trunk")]) == (False, False, True)
    assert finished == 6 and not (out / "s1-1-trunk").exists()
    assert "- trunk s1 seed 1 (`s1-1-trunk`): unfinished" in report.read_text()
    plan = [PlannedRun(row["size"], row["parameters"], row["seed"], row["arm"], row["run_dir"], "name: x\n")
            for row in runs]
    ran = []
    run_sweep(out, plan, lambda run_dir: ran.append(run_dir.name) or (run_dir / "report.md").write_text(""),
              lambda run_dir: pytest.fail(f"nothing was started in {run_dir}"))
    assert ran == ["s1-1-trunk", "s1-1-sft", "late"]  # the unfinished groups, whole; the exported ones skipped


def test_the_command_exports_and_says_so_and_a_bad_directory_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    sweep_dir, _ = _sweep_dir(tmp_path)
    command = [sys.executable, "-m", "coordinator.cli", "export-sweep"]
    done = subprocess.run([*command, str(sweep_dir), str(tmp_path / "out")], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and f"exported 8 of 9 runs; wrote {tmp_path / 'out' / 'sweep.md'}" in done.stdout
    bad = subprocess.run([*command, str(tmp_path / "nowhere"), str(tmp_path / "out2")], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [f"swarm-coordinator export-sweep: error: {tmp_path / 'nowhere'} is not "
                                               "a sweep directory (no sweep.json or job.yaml)"]


def test_an_export_under_docs_results_is_committed_with_its_runs_records():
    """`.gitignore` once ignored every `runs/`, so a committed export lost its runs' records (seed 0 of
    docs/results/sweep-2026-12-02-recalibrated); only the top-level runs/ a job writes is ignored."""
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    check = ["git", "check-ignore", "--no-index", "-q"]
    kept = subprocess.run([*check, "docs/results/a-sweep/runs/ladder-1-seed0/trunk/metrics.jsonl"], cwd=repo)
    ignored = subprocess.run([*check, "runs/a-job/metrics.jsonl"], cwd=repo)
    assert (kept.returncode, ignored.returncode) == (1, 0)
