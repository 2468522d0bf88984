"""A run that starts from another run's saved adapter (model.adapter) trains exactly as that run's next phase did,
and records the adapter it started from so the audit log, replay and lineage.json still rebuild its model.

One run trains phases `first` and `second`; the runs under test start from `first`'s saved adapter and train
`second` alone. Batches are a function of (seed, phase name, phase step) and every phase starts a fresh AdamW,
so continuing the loaded adapter must give the original `second`'s losses step for step (a fresh adapter would
not), and merging it must give the same first loss (merged delta plus a zero-initialised adapter computes the
same function), then its own."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from coordinator.run_dir import read_metrics
from swarm.audit import AuditLog
from swarm.audit.attestation import Attestation
from swarm.lora import load_peft_adapter
from swarm.models.checkpoint import tensors_sha256
from swarm.models.families import family_of_directory
from tests.conftest import job_dict, started_processes
from tests.integration.helpers import finish, swarm_audit

TRAINING = {"steps": None, "batch_size": 4, "micro_batches": 2}
FIRST = {"kind": "sft", "name": "first", "steps": 3, "lr": 0.01}
SECOND = {"kind": "sft", "name": "second", "steps": 3, "lr": 0.01}


def _start(start, directory, name, **sections):
    job_file = directory / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job_dict(training=TRAINING, swarm={"min_nodes": 2}, **sections)))
    run_dir = directory / name
    return run_dir, start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "2", "--run-dir",
                          str(run_dir), "--node-threads", "1", "--no-progress", "--no-baseline")


def _finished(run_dir, process):
    code, output = finish(process, timeout=600)
    assert code == 0, output
    return run_dir


def _losses(run_dir, phase):
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"
            and row["phase"] == phase]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("start-adapter")
    with started_processes() as start:
        original = _finished(*_start(start, tmp, "original", phases=[FIRST, SECOND]))
        adapter = original / "phases" / "01-first" / "adapter"
        model = {"preset": "llama-micro", "adapter": str(adapter)}
        # the two runs from the saved adapter are independent: side by side, each with its own two nodes
        continued = _start(start, tmp, "continued", model=model, phases=[SECOND])
        merged = _start(start, tmp, "merged", model=model, phases=[{**SECOND, "adapter": "merge"}])
        return original, _finished(*continued), _finished(*merged)


def test_continuing_a_saved_adapter_gives_the_losses_of_the_original_runs_next_phase(runs):
    original, continued, _ = runs
    expected, got = _losses(original, "second"), _losses(continued, "second")
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(expected, got)) <= 1e-5, (expected, got)
    assert abs(_losses(original, "first")[0] - got[0]) > 1e-3  # the loaded adapter changed the model


def test_merging_a_saved_adapter_starts_from_the_same_model_and_lineage_lists_it(runs):
    original, _, merged = runs
    assert abs(_losses(original, "second")[0] - _losses(merged, "second")[0]) <= 1e-5
    lineage = json.loads((merged / "phases" / "01-second" / "lineage.json").read_text())
    assert lineage["merged_adapters_in_order"] == [str(merged / "start_adapter")]


def test_the_start_adapter_is_recorded_with_its_hash_in_lineage_and_audit_log(runs):
    original, continued, _ = runs
    source = original / "phases" / "01-first" / "adapter"
    digest = hashlib.sha256((source / "adapter_model.safetensors").read_bytes()).hexdigest()
    lineage = json.loads((continued / "phases" / "01-second" / "lineage.json").read_text())
    assert lineage["merged_adapters_in_order"] == []
    assert lineage["start_adapter"]["source"] == str(source) and lineage["start_adapter"]["sha256"] == digest
    with AuditLog.open(continued / "audit.db") as log:
        entries = list(log.entries())
    events = [json.loads(e.payload) for e in entries if e.kind == "checkpoint"]
    assert {"path": "start_adapter/adapter_model.safetensors", "sha256": digest} == {
        key: value for key, value in events[0].items() if key in ("path", "sha256")}
    # Each node's first step starts from its range's part of the start adapter (the hash attestations state).
    family = family_of_directory(lineage["base_model"])
    _, tensors = load_peft_adapter(source)
    firsts = {}
    for entry in entries:
        if entry.kind == "attestation":
            attestation = Attestation.from_bytes(entry.payload)
            firsts.setdefault(attestation.node_id, attestation)
    assert len(firsts) == 2
    for attestation in firsts.values():
        part = {name: tensor.float() for name, tensor in tensors.items()
                if any(family.is_block_tensor(name, i) for i in range(attestation.block_start, attestation.block_end))}
        assert attestation.adapter_sha256_before == tensors_sha256(part)


def test_a_run_that_merged_its_start_adapter_verifies_and_replays_clean(runs):
    _, _, merged = runs
    verify = swarm_audit("verify", merged)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    replay = swarm_audit("replay", merged, "--sample", "1", "--seed", "0")
    assert replay.returncode == 0 and "replay OK" in replay.stdout, replay.stdout + replay.stderr
