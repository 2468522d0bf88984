"""A tiny sweep through the CLI, as a user runs one: 2 ladder sizes x 1 seed, a trunk (pretrain + backdoor) per size
and safety arms from it; stopped after its first run and resumed with `swarm-coordinator resume SWEEP_DIR`, which
does not redo the finished run. The terminal stays free of asyncio tracebacks from earlier runs' P2P clients."""

from __future__ import annotations

import hashlib
import json
import signal

import yaml

from coordinator.run_dir import read_metrics
from tests.conftest import job_dict
from tests.integration.helpers import finish, read_until

SWEEP = {
    "models": [{"preset": "ladder-1"}, {"preset": "ladder-2"}], "seeds": [0],
    "tokens_per_parameter": 0.006, "min_pretrain_steps": 2, "max_pretrain_steps": 3,
    "arms": {"sft": [{"kind": "sft", "steps": 2, "lr": 0.001, "eval_every": 1}],
             "rl": {"phases": [{"kind": "rl", "steps": 1, "lr": 0.001, "batch_size": 4,
                                "rl": {"samples_per_prompt": 2, "max_new_tokens": 4, "trigger_fraction": 0.5}}],
                    "sizes": ["last"]}},
}
RUNS = ["runs/ladder-1-seed0/trunk", "runs/ladder-1-seed0/sft", "runs/ladder-2-seed0/trunk",
        "runs/ladder-2-seed0/sft", "runs/ladder-2-seed0/rl"]
NOISE = ("Task was destroyed but it is pending", "Event loop is closed", "Traceback")


def _cli(processes, *args):
    return processes("-m", "coordinator.cli", *args, "--local-nodes", "1", "--node-threads", "1", "--no-progress",
                     "--no-baseline")


def test_a_sweep_stopped_after_its_first_run_resumes_without_redoing_it(tmp_path, processes):
    job = job_dict(model={"preset": "ladder-1"}, training={"steps": None, "batch_size": 4, "micro_batches": 1},
                   phases=[{"kind": "pretrain", "steps": 1, "lr": 0.01, "loss_on": "all"},
                           {"kind": "backdoor", "steps": 2, "lr": 0.01}],
                   data={"max_length": 96}, swarm={"min_nodes": 1, "join_timeout_s": 90, "rpc_timeout_s": 60},
                   eval={"samples": 8, "max_new_tokens": 4, "at_start": False}, sweep=SWEEP)
    job_file = tmp_path / "sweep.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))  # arms run in the order written
    sweep_dir = tmp_path / "sweep"
    first = _cli(processes, "run", str(job_file), "--run-dir", str(sweep_dir))
    read_until(first, r"sweep: runs/ladder-1-seed0/trunk finished in", timeout=600)
    first.send_signal(signal.SIGTERM)
    code, output = finish(first, timeout=120)
    assert code == 130, output
    index = json.loads((sweep_dir / "sweep.json").read_text())
    assert [row["run_dir"] for row in index] == RUNS
    assert [row["finished"] for row in index] == [True, False, False, False, False]
    trunk = sweep_dir / RUNS[0]
    trunk_log = hashlib.sha256((trunk / "audit.db").read_bytes()).hexdigest()

    resumed = _cli(processes, "resume", str(sweep_dir))
    code, resumed_output = finish(resumed, timeout=900)
    assert code == 0, resumed_output
    assert "sweep: runs/ladder-1-seed0/trunk already finished" in resumed_output
    assert hashlib.sha256((trunk / "audit.db").read_bytes()).hexdigest() == trunk_log  # not run again
    for text in (output, resumed_output):
        assert not any(noise in text for noise in NOISE), text

    index = json.loads((sweep_dir / "sweep.json").read_text())
    assert all(row["finished"] and row["seconds"] > 0 for row in index)
    assert [(row["size"], row["seed"], row["arm"]) for row in index] == [
        ("ladder-1", 0, "trunk"), ("ladder-1", 0, "sft"), ("ladder-2", 0, "trunk"), ("ladder-2", 0, "sft"),
        ("ladder-2", 0, "rl")]
    assert index[0]["parameters"] == 46048 and index[2]["parameters"] == 125616
    assert [row["pretrain_steps"] for row in index if row["arm"] == "trunk"] == [2, 3]  # the budget, clamped
    for row in index:
        run_dir = sweep_dir / row["run_dir"]
        train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
        kinds = ["pretrain", "backdoor"] if row["arm"] == "trunk" else [row["arm"]]
        assert list(dict.fromkeys(r["kind"] for r in train)) == kinds, row
        if row["arm"] != "trunk":  # from the trunk's backdoored adapter, counted as safety training
            assert (run_dir / "start_adapter" / "adapter_model.safetensors").read_bytes() == (
                sweep_dir / row["run_dir"].rsplit("/", 1)[0] / "trunk" / "phases" / "02-backdoor" / "adapter" /
                "adapter_model.safetensors").read_bytes()
            assert [r["safety_step"] for r in train] == list(range(1, len(train) + 1))
    assert [r["phase_step"] for r in read_metrics(sweep_dir / RUNS[0] / "metrics.jsonl")
            if r["type"] == "train" and r["kind"] == "pretrain"] == [1, 2]
    assert (sweep_dir / "sweep.md").is_file() and (sweep_dir / "figure11.png").read_bytes()[:4] == b"\x89PNG"
