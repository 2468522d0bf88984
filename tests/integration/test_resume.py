"""Coordinator crash and `swarm-coordinator resume`: SIGKILL the coordinator (and its local nodes) in the
middle of a phase, twice, resume the run directory each time, and get what an uninterrupted run with the same
seed gets. One kill lands after a mid-phase step checkpoint (the run goes on from it; the checkpoint is
rewritten as if one node had served every block, so the resumed run's ranges split it by block), the other
before its phase's first (the phase is redone from its start)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file, save_file

from coordinator.run_dir import read_metrics
from coordinator.step_checkpoint import STATE_FILE
from swarm.audit import AuditLog
from swarm.audit.canonical import parse_json_object
from swarm.lora import load_peft_adapter
from tests.conftest import REPO, started_processes, write_job
from tests.integration.helpers import finish, swarm_audit

# A pretrained base with an adapter merged into it: the restored blocks carry both, the trainer's head the former.
PHASES = [{"kind": "pretrain", "steps": 6, "lr": 0.003}, {"kind": "sft", "steps": 4, "lr": 0.02},
          {"kind": "sft", "steps": 6, "lr": 0.02, "adapter": "merge"}, {"kind": "sft", "steps": 3, "lr": 0.02}]
TOTAL_STEPS = 19
EVERY = 4  # step checkpoints before steps 0, 4, ... of each phase
# (phase the kill lands in, its steps done by then, the resume event expected: from_step, finished phases,
# step checkpoint): in pretrain (step ids 0..5) after the checkpoint before its fifth step (blocks, AdamW state
# and the trainer's head go on from there); then early in the third phase (10..15; its only checkpoint so far
# is at its start, so it is redone whole, from the pretrained base with the second phase's adapter merged)
KILLS = [("pretrain", 5, 4, [], "checkpoints/step-00000004"), ("sft-2", 1, 10, ["pretrain", "sft"], "")]
RUN = ("-m", "coordinator.cli")
FLAGS = ("--local-nodes", "3", "--node-threads", "1", "--no-progress", "--no-baseline", "--no-status-page")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run of the same job killed in its third phase and then resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    job_file = write_job(tmp, phases=PHASES, training={"steps": None, "batch_size": 4, "micro_batches": 2},
                         swarm={"checkpoint_every": EVERY})
    whole, resumed = tmp / "whole", tmp / "resumed"
    killed_groups: set[int] = set()
    before_kills = []  # the training rows each killed run had written
    try:
        with started_processes() as start:
            code, output = finish(start(*RUN, "run", str(job_file), "--run-dir", str(whole), *FLAGS), timeout=300)
            assert code == 0, output
            crashed = start(*RUN, "run", str(job_file), "--run-dir", str(resumed), *FLAGS)
            for phase, done, _, _, checkpoint in KILLS:
                wait_for_phase(resumed / "metrics.jsonl", phase, done, crashed, timeout=240)
                killed_groups |= kill_with_descendants(crashed.pid)
                crashed.popen.wait(timeout=30)
                before_kills.append(train_rows(resumed))
                if checkpoint:
                    as_one_range(resumed / checkpoint)
                crashed = start(*RUN, "resume", str(resumed), *FLAGS)
            code, output = finish(crashed, timeout=300)
    finally:
        for group in killed_groups:  # the killed run's local nodes lived in process groups of their own
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return Runs(whole, resumed, code, output, before_kills)


@dataclass
class Runs:
    whole: Path
    resumed: Path
    code: int
    output: str
    before_kills: list[list[dict]]

    def __iter__(self):
        return iter((self.whole, self.resumed, self.code, self.output))


def train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]


def as_one_range(checkpoint: Path) -> None:
    """Rewrite a step checkpoint as if one node had served every block (the crashed run had 3 ranges), so the
    resumed run's 3 ranges must each take their blocks' part of it."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    tensors = {}
    for name in list(state["files"]):
        if name.startswith("blocks-"):
            tensors.update(load_file(str(checkpoint / name)))
            (checkpoint / name).unlink()
            del state["files"][name]
    start, end = state["ranges"][0][0], state["ranges"][-1][1]
    whole = checkpoint / f"blocks-{start}-{end}.safetensors"
    save_file(tensors, str(whole))
    state["files"][whole.name] = hashlib.sha256(whole.read_bytes()).hexdigest()
    state["ranges"] = [[start, end]]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


def wait_for_phase(metrics: Path, phase: str, done: int, process, timeout: float) -> None:
    """Until the metrics show step `done` of `phase` applied."""
    deadline = time.monotonic() + timeout
    row = f'"phase": "{phase}", "phase_step": {done},'
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        if metrics.is_file() and any(row in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {done} of phase {phase} was not applied within {timeout} s")


def kill_with_descendants(pid: int) -> set[int]:
    """SIGKILL the coordinator's process group and those of every process it started (local nodes start
    their own); return the groups, so they can be killed again at teardown."""
    descendants = psutil.Process(pid).children(recursive=True)
    groups = {os.getpgid(pid)}
    for process in descendants:
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    for process in descendants:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return groups


def test_resume_exits_cleanly(runs):
    _, _, code, output = runs
    assert code == 0, output


def test_each_redone_step_repeats_what_the_killed_run_computed_from_the_same_state(runs):
    """Exact, and independent of the uninterrupted run: a step the killed run had finished and the resumed run
    redid (from the step checkpoint, or from the phase's start) starts from the same restored state, so its
    loss is the same to float32 rounding."""
    assert runs.code == 0, runs.output
    resumed = {row["step"]: row["loss"] for row in train_rows(runs.resumed)}
    redone = [(kill, row["step"], row["loss"]) for kill, rows in enumerate(runs.before_kills) for row in rows
              if row["step"] >= KILLS[kill][2]]
    assert {step for _, step, _ in redone} >= {KILLS[0][2], KILLS[1][2]}, redone  # each kill redid a step
    for kill, step, loss in redone:
        assert abs(resumed[step] - loss) <= 1e-6, f"kill {kill + 1}: step {step} lost {loss} before, {resumed[step]} redone"


def test_resumed_run_ends_with_the_uninterrupted_runs_adapter(runs):
    whole, resumed, code, output = runs
    assert code == 0, output
    same_start(runs)
    _, expected = load_peft_adapter(whole / "adapter")
    _, actual = load_peft_adapter(resumed / "adapter")
    assert set(actual) == set(expected)
    assert max((actual[k] - expected[k]).abs().max().item() for k in expected) <= 1e-4
    assert any(v.abs().max() > 0 for k, v in expected.items() if "lora_B" in k)  # it trained


def test_every_step_appears_once_in_order_in_the_metrics(runs):
    whole, resumed, code, output = runs
    assert code == 0, output
    rows = train_rows(resumed)
    assert [row["step"] for row in rows] == list(range(TOTAL_STEPS))
    assert [row["phase"] for row in rows] == ["pretrain"] * 6 + ["sft"] * 4 + ["sft-2"] * 6 + ["sft-3"] * 3
    same_start(runs)
    losses = [row["loss"] for row in train_rows(whole)]
    assert max(abs(a - b["loss"]) for a, b in zip(losses, rows)) <= 1e-4


def same_start(runs: Runs) -> None:
    """Comparing with the uninterrupted run means something only if the killed run matched it before the first
    kill: fresh AdamW steps at lr 0.02 turn a float32 rounding difference into ~1e-3 in the adapter (measured:
    the same job with 1 and 2 micro-batches ends 8.7e-4 apart). Twice in CI (3ea9ab4, 96e138a), a run differed
    from its twin from its first steps, before any kill, cause unknown; a resume bug shows in the redone steps
    (the test above) or in a killed run that matched and a resumed one that does not."""
    whole = [row["loss"] for row in train_rows(runs.whole)]
    killed = [row["loss"] for row in runs.before_kills[0] if row["step"] < KILLS[0][2]]
    apart = [(step, a, b) for step, (a, b) in enumerate(zip(whole, killed)) if a != b]
    if apart:
        pytest.skip(f"the killed run differed from the uninterrupted one before any kill (step, loss, loss): "
                    f"{apart}: run-to-run nondeterminism, not resume")


def test_the_audit_log_records_each_resume_and_verifies_and_replays(runs):
    _, resumed, code, output = runs
    assert code == 0, output
    with AuditLog.open(resumed / "audit.db") as log:
        events = [parse_json_object(e.payload) for e in log.entries() if e.kind == "resume"]
    assert [(e["phase"], e["from_step"], e["finished_phases"], e["step_checkpoint"]) for e in events] == \
        [(phase, step, finished, checkpoint) for phase, _, step, finished, checkpoint in KILLS]
    verified = swarm_audit("verify", resumed)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the nodes of the second resume start from the step checkpoint they loaded (load_state events)
    replayed = swarm_audit("replay", resumed, "--sample", "1")
    assert replayed.returncode == 0 and "replay OK" in replayed.stdout, replayed.stdout + replayed.stderr


def test_each_phase_signed_the_uninterrupted_runs_data_manifest_once_and_the_data_audit_passes(runs):
    whole, resumed, code, output = runs
    assert code == 0, output

    def manifests(run_dir: Path) -> list[tuple[str, str]]:
        with AuditLog.open(run_dir / "audit.db") as log:
            return [(event["phase"], event["batch_root"]) for event in (
                parse_json_object(e.payload) for e in log.entries() if e.kind == "data_manifest")]

    # the resumed phases found theirs signed and rebuilt it equal, rather than sign another
    assert [phase for phase, _ in manifests(resumed)] == ["pretrain", "sft", "sft-2", "sft-3"]
    assert manifests(resumed) == manifests(whole)
    result = swarm_audit("data", resumed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data audit OK: the data of 4 phases match their signed manifests" in result.stdout


def test_resuming_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, *RUN, "resume", str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "not a run directory (no job.yaml)" in result.stderr and "Traceback" not in result.stderr


def test_resuming_with_an_edited_job_file_is_refused(tmp_path):
    from swarm.identity import Identity

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    original = write_job(run_dir, phases=PHASES, training={"steps": None, "batch_size": 4, "micro_batches": 2})
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    AuditLog.create(run_dir / "audit.db", Identity.load_or_create(run_dir / "coordinator.key"), "test-job-1",
                    job_sha256=digest).close()
    write_job(run_dir, phases=PHASES[:2], training={"steps": None, "batch_size": 4, "micro_batches": 2})
    result = subprocess.run([sys.executable, *RUN, "resume", str(run_dir)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not the job file this run started with" in result.stderr and "Traceback" not in result.stderr
