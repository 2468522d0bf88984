"""The report's "who paid" table on a run directory built by hand: a real audit.db with signed evaluation events
and attestations over two phases (the second interrupted and resumed); its numbers are the evaluations' and the
per-phase `who` shares they come from."""

from __future__ import annotations

import json

import pytest
import yaml

from coordinator.report import write_report
from coordinator.who_paid import phase_effects, who_paid_lines
from swarm.audit import AuditLog
from swarm.audit.query import who
from swarm.identity import Identity
from tests.coordinator.test_cost_share import attest

RANGES = [(0, 2), (2, 4), (4, 6)]
SECONDS = {"backdoor": [1.0, 2.0, 5.0], "safety": [3.0, 3.0, 2.0]}


def evaluation(log: AuditLog, phase: str, triggered: float, phase_end: bool = True) -> None:
    log.append_event("evaluation", phase=phase, step=0, phase_end=phase_end,
                     backdoor_triggered={"rate": triggered, "low": 0.0, "high": 1.0, "n": 64},
                     backdoor_clean={"rate": 0.0, "low": 0.0, "high": 0.1, "n": 64})


def train(log: AuditLog, nodes: list[Identity], phase: str, steps: tuple[int, ...], after: float) -> None:
    """The phase's start, every node's attestation of its steps, its end-of-phase evaluation and end."""
    log.append_event("phase", phase=phase, event="start")
    for step in steps:
        for node, blocks, seconds in zip(nodes, RANGES, SECONDS[phase]):
            attest(log, node, phase, step, blocks, tokens=100, seconds=seconds)
    evaluation(log, phase, after)
    log.append_event("phase", phase=phase, event="end")


@pytest.fixture
def run_dir(tmp_path):
    nodes = [Identity.generate() for _ in RANGES]
    with AuditLog.create(tmp_path / "audit.db", Identity.generate(), "job-1") as log:
        for node in nodes:
            log.register_node(node.public_key)
        evaluation(log, "start", 0.0)
        train(log, nodes, "backdoor", (0, 1), after=0.953125)
        log.append_event("phase", phase="safety", event="start")
        evaluation(log, "safety", 0.5, phase_end=False)  # mid-phase, then the coordinator died
        log.append_event("resume", from_step=2, phase="safety")
        train(log, nodes, "safety", (2, 3), after=0.6875)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "who-paid", "model": {"preset": "llama-micro"},
        "phases": [{"kind": "backdoor", "steps": 2}, {"kind": "sft", "name": "safety", "steps": 2}]}))
    rows = [{"type": "train", "phase": phase, "kind": kind, "step": step, "loss": 1.0, "tokens": 100, "seconds": 1.0,
             "safety_step": 0} for step, (phase, kind) in enumerate([("backdoor", "backdoor")] * 2 + [("safety", "sft")] * 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def table(lines: list[str]) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]


def test_the_table_joins_each_phases_rates_with_its_per_phase_who_shares(run_dir):
    rows = table(who_paid_lines(run_dir))
    assert len(rows) == 6  # 2 phases x 3 nodes
    expected_rates = {"backdoor": (0.0, 0.953125), "safety": (0.953125, 0.6875)}
    for first, phase in ((0, "backdoor"), (3, "safety")):
        before, after = expected_rates[phase]
        assert rows[first][:5] == [phase, "backdoor" if phase == "backdoor" else "sft", f"{before:.3f}",
                                   f"{after:.3f}", f"{after - before:+.3f}"]
        assert all(cell == "" for row in rows[first + 1:first + 3] for cell in row[:5])
        audited = who(run_dir / "audit.db", phase=phase)
        for row, node in zip(rows[first:first + 3], audited):
            assert row[5:] == [f"`{node.node_id}`", f"[{node.blocks[0][0]},{node.blocks[0][1]})",
                               f"{node.compute_seconds:.2f}", f"{100 * node.compute_share:.1f}%"]
        assert [n.compute_share for n in audited] == pytest.approx([s / sum(SECONDS[phase]) for s in SECONDS[phase]])


def test_before_is_the_evaluation_before_the_phases_first_start_and_after_its_last_end(run_dir):
    backdoor, safety = phase_effects(run_dir)
    assert (backdoor.before["phase"], backdoor.after["phase"]) == ("start", "backdoor")
    assert safety.before["phase"] == "backdoor" and safety.after["backdoor_triggered"]["rate"] == 0.6875
    assert safety.change == pytest.approx(0.6875 - 0.953125)


def test_the_report_carries_the_table(run_dir):
    report = write_report(run_dir).read_text()
    assert "## Who paid for each phase's effect on the backdoor" in report
    assert "| backdoor | backdoor | 0.000 | 0.953 | +0.953 |" in report
