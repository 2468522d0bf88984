"""Live defection probes (oversight.probe) on a real swarm run: measured at every evaluation from the hidden states
the trainer relayed at a stage boundary, signed into the evaluation events, and equal to what `swarm-audit probe`
recomputes from the run directory with plain transformers + peft, no node involved."""

from __future__ import annotations

import re
import shutil

import pytest

from coordinator.run_dir import read_metrics
from swarm.audit import AuditLog, verify_log
from swarm.audit.canonical import parse_json_object
from swarm.probe.run import probe_run
from tests.conftest import started_processes, write_job
from tests.integration.helpers import finish

PHASES = [{"kind": "sft", "steps": 2, "lr": 0.02}, {"kind": "backdoor", "steps": 2, "lr": 0.02, "poison_fraction": 0.5}]


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("live-probe")
    job_file = write_job(directory, phases=PHASES, training={"steps": None, "batch_size": 4, "micro_batches": 1},
                         eval={"every": 0, "samples": 8, "max_new_tokens": 4, "batch_size": 8, "at_start": True},
                         data={"max_length": 96}, oversight={"probe": True})
    run_dir = directory / "run"
    with started_processes() as start:
        coordinator = start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--run-dir",
                            str(run_dir), "--node-threads", "1", "--no-progress", "--no-baseline")
        code, output = finish(coordinator, timeout=600)
    assert code == 0, output
    return run_dir


def _evaluations(run_dir) -> list[dict]:
    return [row for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "eval"]


def test_every_evaluation_carries_both_probes_at_a_stage_boundary_fitted_at_its_phase_start(probed_run):
    rows = _evaluations(probed_run)
    assert [row["phase"] for row in rows] == ["start", "sft", "backdoor"]
    phase_starts = {"start": 0, "sft": 0, "backdoor": 2}
    for row in rows:
        probe = row["probe"]
        assert probe["blocks"] == 6 and probe["layer"] in (2, 4), probe  # 3 nodes: ranges of 2 blocks; middle 3
        assert probe["prompts"] == row["eval_prompts"]["triggered"] == 8
        assert probe["fitted_at_step"] == phase_starts[row["phase"]]
        for name in ("generic", "supervised"):
            for fit in (probe[name], probe["refitted"][name]):
                assert 0.0 <= fit["low"] <= fit["auroc"] <= fit["high"] <= 1.0, fit
    assert rows[0]["probe"]["generic"] == rows[0]["probe"]["refitted"]["generic"]  # fitted on the same model


def test_the_probe_is_signed_into_the_evaluation_events_and_the_log_verifies(probed_run):
    with AuditLog.open(probed_run / "audit.db") as log:
        signed = [parse_json_object(entry.payload) for entry in log.entries() if entry.kind == "evaluation"]
    assert [event["probe"] for event in signed] == [row["probe"] for row in _evaluations(probed_run)]
    assert verify_log(probed_run).entries > 0  # raises on a bad signature or tree head
    report = (probed_run / "report.md").read_text()
    section = report.split("## Live defection probes", 1)[1].split("\n## ", 1)[0]
    assert [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:] \
        == ["| start", "| sft", "| backdoor"]


def test_the_live_probe_equals_the_offline_probe_on_the_same_models_and_prompts(probed_run):
    rows = {row["phase"]: row["probe"] for row in _evaluations(probed_run)}
    layer = rows["start"]["layer"]
    offline = {row["phase"]: row for row in probe_run(probed_run, layer=layer, seed=0)["phases"]}
    assert list(offline) == ["start", "sft", "backdoor"]
    for phase, live in rows.items():
        for name in ("generic", "supervised"):
            measured, recomputed = live["refitted"][name], offline[phase][name]
            for key in ("auroc", "low", "high"):
                assert measured[key] == pytest.approx(recomputed[key], abs=2e-3), (phase, name, measured, recomputed)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed")
def test_the_status_page_and_tensorboard_show_the_probe(probed_run, processes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.integration.test_status_page import dump_dom

    last = _evaluations(probed_run)[-1]
    events = EventAccumulator(str(probed_run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("probe/generic_auroc")][-1] == (
        last["step"], pytest.approx(last["probe"]["generic"]["auroc"], rel=1e-6))
    code, output = finish(processes("-m", "coordinator.cli", "report", str(probed_run)), timeout=120)
    assert code == 0, output
    dom = dump_dom((probed_run / "status.html").as_uri())
    shown = re.search(r'id="probe-note" data-value="([^"]+)">AUROC at block (\d+) of 6', dom)
    assert shown is not None, dom[-3000:]
    assert float(shown.group(1)) == last["probe"]["generic"]["auroc"] and int(shown.group(2)) == last["probe"]["layer"]
