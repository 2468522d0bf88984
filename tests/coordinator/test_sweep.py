"""Running a sweep's runs: sweep.json indexes every run, and a sweep run again skips what finished, resumes what
had started and starts the rest afresh (the runs here are stand-ins that write what a real run writes)."""

from __future__ import annotations

import json

import pytest

from coordinator.sweep import SweepError, run_sweep
from coordinator.sweep_plan import PlannedRun


@pytest.fixture(autouse=True)
def reports(monkeypatch):
    """The sweep's calls of coordinator.sweep_report (the stand-in runs leave nothing to report on)."""
    import coordinator.sweep_report

    seen = []
    monkeypatch.setattr(coordinator.sweep_report, "write_sweep_report",
                        lambda sweep_dir, rows, wall_seconds=None, implanted_min=None:
                        seen.append((sweep_dir, [row["finished"] for row in rows], wall_seconds, implanted_min)))
    return seen


def _plan(*arms: str) -> list[PlannedRun]:
    return [PlannedRun("ladder-1", 46048, 0, arm, f"runs/ladder-1-seed0/{arm}", f"name: {arm}\n",
                       100 if arm == "trunk" else None) for arm in arms]


class Runs:
    """Stand-ins for a run: each writes an audit log and, unless told to fail, the report a run writes last."""

    def __init__(self, fail: set[str] = frozenset()):
        self.fresh, self.resumed, self.fail = [], [], set(fail)

    def _run(self, run_dir, calls):
        calls.append(run_dir.name)
        (run_dir / "audit.db").write_text("")
        if run_dir.name in self.fail:
            raise KeyboardInterrupt
        (run_dir / "report.md").write_text("")

    def run_fresh(self, run_dir):
        assert (run_dir / "job.yaml").is_file() and len(list(run_dir.iterdir())) == 1
        self._run(run_dir, self.fresh)

    def resume_run(self, run_dir):
        self._run(run_dir, self.resumed)


def test_every_run_is_indexed_with_its_size_seed_arm_directory_and_wall_time(tmp_path):
    runs = Runs()
    rows = run_sweep(tmp_path, _plan("trunk", "sft"), runs.run_fresh, runs.resume_run)
    assert runs.fresh == ["trunk", "sft"] and not runs.resumed
    assert rows == json.loads((tmp_path / "sweep.json").read_text())
    assert [{k: row[k] for k in ("size", "parameters", "seed", "arm", "run_dir", "finished", "pretrain_steps")}
            for row in rows] == [
        {"size": "ladder-1", "parameters": 46048, "seed": 0, "arm": "trunk", "run_dir": "runs/ladder-1-seed0/trunk",
         "finished": True, "pretrain_steps": 100},
        {"size": "ladder-1", "parameters": 46048, "seed": 0, "arm": "sft", "run_dir": "runs/ladder-1-seed0/sft",
         "finished": True, "pretrain_steps": None}]
    assert all(row["seconds"] >= 0 for row in rows)
    assert (tmp_path / "runs" / "ladder-1-seed0" / "sft" / "job.yaml").read_text() == "name: sft\n"


def test_a_sweep_run_again_skips_finished_runs_and_resumes_the_one_that_had_started(tmp_path):
    interrupted = Runs(fail={"sft"})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path, _plan("trunk", "sft", "rl"), interrupted.run_fresh, interrupted.resume_run)
    assert interrupted.fresh == ["trunk", "sft"]
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["finished"] for row in rows] == [True, False, False]
    again = Runs()
    rows = run_sweep(tmp_path, _plan("trunk", "sft", "rl"), again.run_fresh, again.resume_run)
    assert again.resumed == ["sft"] and again.fresh == ["rl"]
    assert all(row["finished"] for row in rows)


def test_a_run_that_finished_after_the_index_was_written_is_not_run_again(tmp_path):
    first = Runs()
    run_sweep(tmp_path, _plan("trunk"), first.run_fresh, first.resume_run)
    (tmp_path / "sweep.json").write_text(json.dumps([{"run_dir": "runs/ladder-1-seed0/trunk", "finished": False}]))
    again = Runs()
    rows = run_sweep(tmp_path, _plan("trunk"), again.run_fresh, again.resume_run)
    assert not again.fresh and not again.resumed and rows[0]["finished"]


def test_a_run_indexed_as_finished_whose_records_are_gone_is_run_again(tmp_path):
    """As in a copy of a sweep whose run directories were lost (a .gitignore once dropped an export's runs/)."""
    first = Runs()
    run_sweep(tmp_path, _plan("trunk", "sft"), first.run_fresh, first.resume_run)
    (tmp_path / "runs" / "ladder-1-seed0" / "trunk" / "report.md").unlink()
    again = Runs()
    rows = run_sweep(tmp_path, _plan("trunk", "sft"), again.run_fresh, again.resume_run)
    assert again.resumed == ["trunk"] and not again.fresh  # its audit log is there: it is resumed
    assert [row["finished"] for row in rows] == [True, True]


def test_a_run_that_never_started_is_started_afresh_in_an_emptied_directory(tmp_path):
    leftover = tmp_path / "runs" / "ladder-1-seed0" / "trunk"
    leftover.mkdir(parents=True)
    (leftover / "coordinator.log").write_text("crashed before its session started")
    runs = Runs()
    run_sweep(tmp_path, _plan("trunk"), runs.run_fresh, runs.resume_run)
    assert runs.fresh == ["trunk"] and not (leftover / "coordinator.log").exists()


def test_a_started_run_whose_job_file_the_sweep_would_write_differently_is_refused(tmp_path):
    interrupted = Runs(fail={"trunk"})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path, _plan("trunk"), interrupted.run_fresh, interrupted.resume_run)
    changed = [PlannedRun("ladder-1", 46048, 0, "trunk", "runs/ladder-1-seed0/trunk", "name: edited\n", 100)]
    with pytest.raises(SweepError, match="is not the job file the sweep gives"):
        run_sweep(tmp_path, changed, Runs().run_fresh, Runs().resume_run)


def test_the_report_is_rewritten_after_each_finished_run_and_once_every_run_is_done(tmp_path, reports):
    interrupted = Runs(fail={"sft"})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tmp_path, _plan("trunk", "sft"), interrupted.run_fresh, interrupted.resume_run, implanted_min=0.7)
    assert [(finished, threshold) for _, finished, _, threshold in reports] == [([True, False], 0.7)]
    runs = Runs()
    rows = run_sweep(tmp_path, _plan("trunk", "sft"), runs.run_fresh, runs.resume_run, implanted_min=0.7)
    assert reports[1:] == [(tmp_path, [True, True], pytest.approx(sum(row["seconds"] for row in rows)), 0.7)]
