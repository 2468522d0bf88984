"""The walking skeleton end to end: real node processes, real DHT/P2P, real gRPC, real checkpoints; 3 ranges
and 4 micro-batches, pipelined (the default), equal single-process peft."""

from __future__ import annotations

import json

import pytest

from coordinator.run_dir import read_metrics
from swarm.config import load_job
from swarm.lora import load_peft_adapter
from swarm.models.checkpoint import resolve_model
from swarm.reference import train_reference
from tests.conftest import started_processes, write_job
from tests.integration.helpers import finish

STEPS = 4


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `swarm-coordinator run JOB --local-nodes 3`, as a user types it."""
    tmp = tmp_path_factory.mktemp("cli-run")
    job_file = write_job(tmp, training={"steps": STEPS, "batch_size": 8, "micro_batches": 4})  # pipelined: 3 at once
    run_dir = tmp / "run"
    with started_processes() as start:
        process = start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--run-dir",
                        str(run_dir), "--node-threads", "1")
        code, output = finish(process, timeout=300)
    assert code == 0, output
    return job_file, run_dir, output


def test_run_directory_holds_metrics_adapter_and_job(cli_run):
    job_file, run_dir, output = cli_run
    assert (run_dir / "job.yaml").read_text() == job_file.read_text()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert all(row["type"] == "train" for row in rows)  # no eval section: no evaluation rows
    assert [row["step"] for row in rows] == list(range(STEPS))
    assert all(row["loss"] > 0 and row["tokens"] > 0 and row["seconds"] > 0 for row in rows)
    config, tensors = load_peft_adapter(run_dir / "adapter")
    assert config["peft_type"] == "LORA" and config["r"] == 4
    blocks = {int(key.split(".")[2]) for key in tensors}
    assert blocks == set(range(6))  # every node's adapter was gathered
    nodes = json.loads((run_dir / "nodes.json").read_text())
    assert sorted(tuple(n["blocks"]) for n in nodes) == [(0, 2), (2, 4), (4, 6)]
    assert "train: 100%" in output and "loss=" in output and "tok_s=" in output
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").is_file()
    assert (run_dir / "phases" / "01-train" / "adapter" / "adapter_model.safetensors").is_file()


def test_swarm_training_equals_single_process_peft_training(cli_run):
    job_file, run_dir, _ = cli_run
    job = load_job(job_file)
    reference = train_reference(resolve_model(job.model), job)
    swarm_losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl")]
    assert max(abs(a - b) for a, b in zip(swarm_losses, reference.losses)) <= 1e-4
    assert swarm_losses[-1] != swarm_losses[0]  # it trained
    _, swarm_adapter = load_peft_adapter(run_dir / "adapter")
    assert set(swarm_adapter) == set(reference.adapter)
    worst = max((swarm_adapter[k] - reference.adapter[k]).abs().max().item() for k in swarm_adapter)
    assert worst <= 1e-4
    moved = max(reference.adapter[k].abs().max().item() for k in reference.adapter if "lora_B" in k)
    assert moved > 1e-3  # B started at zero: the comparison is not between two untouched adapters
