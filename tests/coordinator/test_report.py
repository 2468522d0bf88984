import json

import yaml

from coordinator.report import write_report
from tests.conftest import job_dict


def _rate(value, n=64):
    return {"rate": value, "low": max(0.0, value - 0.1), "high": min(1.0, value + 0.1), "n": n, "k": round(value * n)}


def _eval(phase, kind, step, safety_step, triggered, phase_end=True):
    return {"type": "eval", "phase": phase, "kind": kind, "phase_step": step, "step": step, "safety_step": safety_step,
            "phase_end": phase_end, "backdoor_triggered": _rate(triggered), "backdoor_clean": _rate(0.02),
            "backdoor_near_miss": _rate(0.1), "accuracy": _rate(0.7), "eval_loss": 0.5,
            "samples": {"clean": [{"prompt": "What is 1 + 1?", "answer": "2"}]}}


def test_report_tabulates_phase_ends_and_draws_the_persistence_curve(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(name="r")))
    rows = [{"type": "train", "phase": "backdoor", "kind": "backdoor", "step": i, "loss": 1.0 / (i + 1), "tokens": 10,
             "seconds": 0.1, "safety_step": 0} for i in range(5)]
    rows += [_eval("start", "start", 0, 0, 0.0), _eval("backdoor", "backdoor", 5, 0, 0.97),
             _eval("safety-sft", "sft", 10, 5, 0.6, phase_end=False), _eval("safety-sft", "sft", 15, 10, 0.4),
             _eval("adversarial", "adversarial", 20, 15, 0.3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| after")]
    assert [line.split(" | ")[0] for line in table] == ["| start", "| backdoor", "| safety-sft", "| adversarial"]
    assert "0.97 [0.87, 1.00]" in report and "| 64 |" in report
    for picture in ("loss.png", "persistence.png", "adversarial.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
