"""Every run writes a verifiable audit log: a real job with 3 node processes, then `swarm-audit` on its
audit.db, its attestations read back, and the file tampered with as an attacker would."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from coordinator.baseline import TIMED_STEPS
from coordinator.cost_share import cost_share
from coordinator.chain import RemoteChain, RemoteStage
from coordinator.run_dir import read_metrics
from swarm.audit import AuditLog, verify_log
from swarm.audit.attestation import Attestation, MicroBatch, sign_attestation
from swarm.audit.canonical import parse_json_object
from swarm.audit.errors import AttestationError
from swarm.audit.query import who
from swarm.audit.sketch import tensor_sha256
from swarm.identity import Identity
from swarm.proto.blocks_pb2 import CallResult
from tests.conftest import REPO, started_processes, write_job
from tests.integration.helpers import finish

MICRO_BATCHES = 2
PHASES = [{"kind": "sft", "steps": 3, "lr": 0.01}, {"kind": "sft", "steps": 2, "lr": 0.01, "adapter": "merge"}]
TREE_HEAD_EVERY = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One `swarm-coordinator run` of two short phases on 3 local nodes."""
    tmp = tmp_path_factory.mktemp("audit-run")
    job_file = write_job(tmp, training={"steps": None, "batch_size": 4, "micro_batches": MICRO_BATCHES},
                         phases=PHASES, audit={"tree_head_every": TREE_HEAD_EVERY})
    with started_processes() as start:
        process = start("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--run-dir",
                        str(tmp / "run"), "--node-threads", "1", "--no-progress")
        code, output = finish(process, timeout=600)
    assert code == 0, output
    return tmp / "run"


def swarm_audit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm.audit.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def attestations(path) -> list[tuple[int, Attestation]]:
    with AuditLog.open(path) as log:
        return [(e.index, Attestation.from_bytes(e.payload)) for e in log.entries() if e.kind == "attestation"]


def events(path, kind: str) -> list[dict]:
    with AuditLog.open(path) as log:
        return [parse_json_object(e.payload) for e in log.entries() if e.kind == kind]


def test_the_finished_runs_log_verifies_and_its_last_tree_head_covers_every_entry(run_dir):
    result = swarm_audit("verify", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    report = verify_log(run_dir)
    assert report.attestations == 3 * 5 and report.nodes == 3
    assert report.signed_size == report.entries
    # every 2 steps (after steps 1 and 3), at both phase ends, and at the end of the run
    assert report.tree_heads == 5


def test_who_names_each_node_with_its_blocks_steps_and_the_tokens_the_trainer_sent(run_dir):
    nodes = json.loads((run_dir / "nodes.json").read_text())
    train = [row for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]
    result = swarm_audit("who", run_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "BLOCKS", "PHASES", "STEPS", "FIRST..LAST", "TOKENS", "COMPUTE_S", "SHARE",
                                "SENT_MB", "RECEIVED_MB"]
    rows = {cells[0]: cells for cells in (line.split() for line in lines[1:4])}
    assert set(rows) == {node["node_id"] for node in nodes}
    shares = 0.0
    for node in nodes:
        _, blocks, phases, steps, span, tokens, _, share, sent, received = rows[node["node_id"]]
        assert float(sent) > 0 and float(received) > 0
        assert blocks == f"[{node['blocks'][0]},{node['blocks'][1]})"
        assert phases == "sft,sft-2"
        assert int(steps) == len(train) and span == f"0..{len(train) - 1}"
        assert int(tokens) == sum(row["tokens"] for row in train)
        shares += float(share.rstrip("%"))
    assert shares == pytest.approx(100.0, abs=0.15)  # each share is rounded to 0.1%


def test_the_reports_cost_shares_sum_to_one_and_match_swarm_audit_who(run_dir):
    share = cost_share(run_dir)
    audited = {row.node_id: row for row in who(run_dir / "audit.db")}
    assert {node.node_id for node in share.nodes} == set(audited) and len(audited) == 3
    assert sum(node.compute_share for node in share.nodes) == pytest.approx(1.0)
    assert sum(node.flops_share for node in share.nodes) == pytest.approx(1.0)
    for node in share.nodes:
        row = audited[node.node_id]
        assert (node.tokens, node.compute_seconds, node.compute_share) == (row.tokens, row.compute_seconds,
                                                                           row.compute_share)
    header, *lines = swarm_audit("who", run_dir).stdout.splitlines()
    column = header.split().index("SHARE")
    cli = {cells[0]: float(cells[column].rstrip("%")) for cells in (line.split() for line in lines[:3])}
    report = (run_dir / "report.md").read_text()
    for node in share.nodes:
        (line,) = [line for line in report.splitlines() if line.startswith(f"| `{node.node_id}`")]
        assert float(line.split(" | ")[5].rstrip("%")) == pytest.approx(cli[node.node_id], abs=0.051)


def test_every_node_reported_its_peak_memory_and_the_one_machine_baseline_was_measured(run_dir):
    for node in json.loads((run_dir / "nodes.json").read_text()):
        assert node["peak_rss_bytes"] >= node["rss_after_load"] > 0  # a high-water mark, heard after training
        assert node["peak_device_bytes"] == 0  # CPU nodes
    baseline = json.loads((run_dir / "baseline.json").read_text())
    assert baseline["steps_timed"] == TIMED_STEPS and baseline["seconds_per_token"] > 0, baseline
    share = cost_share(run_dir)
    assert share.one_machine.seconds > 0 and share.one_machine.peak_rss_bytes > 0
    assert "| peak memory |" in (run_dir / "report.md").read_text()


def test_each_attestation_lists_every_micro_batch_and_the_steps_real_cost(run_dir):
    for _, attestation in attestations(run_dir):
        assert [batch.id for batch in attestation.micro_batches] == list(range(MICRO_BATCHES))
        assert attestation.replica_group == f"blocks-{attestation.block_start}-{attestation.block_end}"
        assert len(attestation.gradient_sketch) == 64 and any(attestation.gradient_sketch)
        assert attestation.compute_seconds > 0 and attestation.bytes_sent > 0 and attestation.bytes_received > 0
        assert attestation.adapter_sha256_after != attestation.adapter_sha256_before


def test_a_nodes_adapter_after_a_step_is_its_adapter_before_the_next_within_a_phase(run_dir):
    by_node_phase = defaultdict(list)
    for _, attestation in attestations(run_dir):
        by_node_phase[attestation.node_id, attestation.phase].append(attestation)
    assert len(by_node_phase) == 3 * 2
    for steps in by_node_phase.values():
        steps.sort(key=lambda a: a.step)
        for previous, following in zip(steps, steps[1:]):
            assert following.step == previous.step + 1
            assert following.adapter_sha256_before == previous.adapter_sha256_after


def test_assignments_phases_and_checkpoints_are_signed_events(run_dir):
    nodes = json.loads((run_dir / "nodes.json").read_text())
    assignments = {e["node_id"]: [e["block_start"], e["block_end"]] for e in events(run_dir, "assignment")}
    assert assignments == {node["node_id"]: node["blocks"] for node in nodes}
    assert [(e["phase"], e["event"]) for e in events(run_dir, "phase")] == [
        ("sft", "start"), ("sft", "end"), ("sft-2", "start"), ("sft-2", "end")]
    checkpoints = events(run_dir, "checkpoint")
    # a step checkpoint before each phase's first step (the phases are shorter than swarm.checkpoint_every)
    step_files = [e for e in checkpoints if "step_checkpoint" in e]
    firsts = [e["first_step"] for e in events(run_dir, "phase") if e["event"] == "start"]
    assert sorted({e["step_checkpoint"] for e in step_files}) == firsts
    assert all(e["path"].startswith(f"checkpoints/step-{e['step_checkpoint']:08d}/") for e in step_files)
    assert [e["path"] for e in checkpoints if "replay_step" not in e and "step_checkpoint" not in e] == [
        "phases/01-sft/adapter/adapter_model.safetensors", "phases/02-sft-2/adapter/adapter_model.safetensors",
        "adapter/adapter_model.safetensors"]
    snapshots = [e for e in checkpoints if "replay_step" in e]  # audit.snapshots_per_phase: 2 by default
    assert [e["phase"] for e in snapshots] == ["sft", "sft", "sft-2", "sft-2"]
    assert all(e["path"] == f"snapshots/step-{e['replay_step']:06d}.safetensors" for e in snapshots)
    for event in checkpoints:
        assert event["sha256"] == hashlib.sha256((run_dir / event["path"]).read_bytes()).hexdigest()


def test_the_chat_format_the_run_rendered_with_is_recorded_and_signed(run_dir):
    recorded = json.loads((run_dir / "chat_format.json").read_text())
    assert recorded["format"] == "builtin"  # a character-level preset: our own format
    assert recorded["prompt"] == "User: {prompt}\nAssistant: "
    assert [(e["format"], e["sha256"]) for e in events(run_dir, "chat_format")] == [("builtin", recorded["sha256"])]


def test_each_phase_signed_its_data_manifest_and_swarm_audit_data_holds_the_trainers_inputs_to_it(run_dir):
    manifests = events(run_dir, "data_manifest")
    starts = [e for e in events(run_dir, "phase") if e["event"] == "start"]
    assert [(m["phase"], m["first_step"], m["steps"]) for m in manifests] == [("sft", 0, 3), ("sft-2", 3, 2)]
    assert [m["first_step"] for m in manifests] == [e["first_step"] for e in starts]
    result = swarm_audit("data", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    # block 0's attested input hashes are the trainer's embeddings of the committed micro-batches, at every step
    assert "attested inputs of block 0: 3 steps checked, all match\n" in result.stdout
    assert "attested inputs of block 0: 2 steps checked, all match\n" in result.stdout
    assert "data audit OK: the data of 2 phases match their signed manifests" in result.stdout


def test_an_edited_attestation_in_the_finished_log_fails_verify_naming_that_entry(run_dir, tmp_path):
    tampered = tmp_path / "audit.db"
    with sqlite3.connect(f"file:{run_dir / 'audit.db'}?mode=ro", uri=True) as source:
        target = sqlite3.connect(tampered)
        source.backup(target)
    index, attestation = attestations(tampered)[4]
    for (trigger,) in target.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        target.execute(f"DROP TRIGGER {trigger}")
    payload = target.execute("SELECT payload FROM entries WHERE idx = ?", (index,)).fetchone()[0]
    forged = payload.replace(f'"tokens":{attestation.tokens}'.encode(), f'"tokens":{attestation.tokens * 2}'.encode())
    assert forged != payload
    target.execute("UPDATE entries SET payload = ? WHERE idx = ?", (forged, index))
    target.commit()
    target.close()
    result = swarm_audit("verify", tampered)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"first bad entry {index}:" in result.stdout


def test_the_honest_run_replays_clean(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)  # replay writes replay.json into the run directory
    replay = swarm_audit("replay", copy, "--sample", "1", "--seed", "0")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replay OK" in replay.stdout and "replayed 4 of 4 snapshotted steps" in replay.stdout
    report = json.loads((copy / "replay.json").read_text())
    checks = [node for step in report["replayed"] for node in step["nodes"]]
    assert len(checks) == 12 and report["attested_steps"] == 15 and not report["findings"]
    assert max(n["sketch_error"] for n in checks) <= 1e-3 and max(n["weights_error"] for n in checks) <= 1e-2
    who_table = swarm_audit("who", copy).stdout
    assert who_table.splitlines()[0].endswith("REPLAY") and who_table.count(" ok\n") == 3


def test_replay_refuses_a_snapshot_changed_after_the_log_recorded_it(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    snapshot = sorted((copy / "snapshots").glob("*.safetensors"))[0]
    data = bytearray(snapshot.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor
    snapshot.write_bytes(bytes(data))
    replay = swarm_audit("replay", copy, "--sample", "1")
    assert replay.returncode == 2, replay.stdout + replay.stderr
    assert "differs from the file the audit log recorded" in replay.stderr
    bad_sample = swarm_audit("replay", copy, "--sample", "0")
    assert bad_sample.returncode == 2 and "--sample must be in (0, 1]" in bad_sample.stderr


# -- the trainer's check before appending, without processes: the node's reply is forged in place --------


def one_stage_chain(tmp_path, node: Identity) -> tuple[RemoteChain, AuditLog]:
    audit = AuditLog.create(tmp_path / "audit.db", Identity.generate(), "job-1")
    audit.register_node(node.public_key)
    chain = RemoteChain(None, None, [RemoteStage(None, 0, 2, node.fingerprint)], "job-1", 10.0, audit)
    return chain, audit


def reply_with(chain: RemoteChain, signed) -> None:
    def call(stage, method, meta, tensors=(), codecs=None):
        if method.endswith("step"):
            return CallResult(attestation=signed.payload, signature=signed.signature), []
        return CallResult(), [tensors[0]]

    chain.transport.call = call


def attestation_for(node: Identity, hidden: torch.Tensor, **changes) -> Attestation:
    fields = dict(
        job_id="job-1", phase="train", step=0, block_start=0, block_end=2, replica_group="blocks-0-2",
        node_id=node.fingerprint, micro_batches=(MicroBatch(0, tensor_sha256(hidden)),),
        adapter_sha256_before="0" * 64, adapter_sha256_after="1" * 64,
        optimizer_sha256_before="2" * 64, optimizer_sha256_after="3" * 64, gradient_sketch=(0.5,), tokens=6,
        compute_seconds=0.1, bytes_sent=1, bytes_received=1,
    )  # fmt: skip
    return Attestation(**{**fields, **changes})


@pytest.mark.parametrize("changes, reason", [
    ({"step": 1}, "step 1 (asked 0)"),
    ({"block_end": 3}, "block_end 3 (asked 2)"),
    ({"tokens": 12}, "claims 12 tokens; this trainer sent 6"),
    ({"micro_batches": (MicroBatch(0, "f" * 64),)}, "input hashes other than"),
])  # fmt: skip
def test_an_attestation_for_other_work_than_asked_fails_the_step_naming_the_node(tmp_path, changes, reason):
    node = Identity.generate()
    chain, audit = one_stage_chain(tmp_path, node)
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    reply_with(chain, sign_attestation(attestation_for(node, hidden, **changes), node))
    chain.forward(hidden, mask, mask, step=0, micro_batch=0, train=True)
    with pytest.raises(AttestationError, match=f"node {node.fingerprint} .*step 0: .*{re.escape(reason)}"):
        chain.apply_step(0, 0.01)
    assert len(audit) == 2  # job_start and join: nothing appended


def test_an_attestation_signed_by_another_key_is_refused_and_a_good_one_appended(tmp_path):
    node, impostor = Identity.generate(), Identity.generate()
    chain, audit = one_stage_chain(tmp_path, node)
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    good = sign_attestation(attestation_for(node, hidden), node)
    reply_with(chain, type(good)(good.payload, impostor.sign(good.payload)))
    chain.forward(hidden, mask, mask, step=0, micro_batch=0, train=True)
    with pytest.raises(AttestationError, match="does not verify under the node's registered key"):
        chain.apply_step(0, 0.01)
    reply_with(chain, good)
    chain.forward(hidden, mask, mask, step=0, micro_batch=0, train=True)
    chain.apply_step(0, 0.01)
    assert [entry.kind for entry in audit.entries()] == ["job_start", "join", "attestation"]
