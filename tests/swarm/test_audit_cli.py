"""swarm-audit as an overseer runs it: real processes on a real run directory; exit codes and output."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from swarm.audit import AuditLog
from tests.conftest import REPO
from tests.swarm.test_audit_log import PHASES, RANGES, STEPS_PER_PHASE, attacker, build_log


def swarm_audit(*args) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "swarm.audit.cli", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir, build_log(run_dir)


def test_verify_accepts_a_run_directory_or_its_audit_db(run):
    run_dir, built = run
    for target in (run_dir, built.path):
        result = swarm_audit("verify", target)
        assert result.returncode == 0, result.stdout
        assert "audit log OK" in result.stdout
        assert f"{built.entries} entries ({len(built.attestations)} attestations from 3 nodes)" in result.stdout
        assert f"coordinator {built.coordinator.fingerprint}" in result.stdout


def test_verify_names_the_first_bad_entry_of_a_tampered_log(run):
    run_dir, built = run
    index = built.attestations[5]
    connection = attacker(built.path)
    connection.execute("UPDATE entries SET signature = zeroblob(64) WHERE idx = ?", (index,))
    connection.close()
    result = swarm_audit("verify", run_dir)
    assert result.returncode == 1
    assert "audit log INVALID" in result.stdout
    assert f"first bad entry {index}: " in result.stdout


def test_verify_with_a_pinned_coordinator(run):
    run_dir, built = run
    assert swarm_audit("verify", run_dir, "--coordinator", built.coordinator.fingerprint).returncode == 0
    result = swarm_audit("verify", run_dir, "--coordinator", "0123456789abcdef")
    assert result.returncode == 1 and "first bad entry 0" in result.stdout


@pytest.mark.parametrize("command", ["verify", "who", "export"])
def test_user_mistakes_exit_2_with_one_clear_line(tmp_path, command):
    extra = ["--jsonl"] if command == "export" else []
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello, this is not a database\n" * 100)
    other_db = tmp_path / "other.db"
    sqlite3.connect(other_db).execute("CREATE TABLE t (x)").connection.commit()
    (tmp_path / "empty_run").mkdir()
    cases = [
        (tmp_path / "absent", "does not exist"),
        (tmp_path / "empty_run", "has no audit.db"),
        (not_db, "is not an audit log"),
        (other_db, "is an SQLite file but not an audit log"),
    ]
    for target, words in cases:
        result = swarm_audit(command, target, *extra)
        assert result.returncode == 2, (target, result.stdout, result.stderr)
        assert words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_who_prints_a_table_whose_shares_sum_to_one(run):
    run_dir, built = run
    result = swarm_audit("who", run_dir)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NODE", "BLOCKS", "PHASES", "STEPS", "FIRST..LAST", "TOKENS", "COMPUTE_S", "SHARE",
                                "SENT_MB", "RECEIVED_MB"]
    body = [line.split() for line in lines[1:4]]
    steps = len(PHASES) * STEPS_PER_PHASE
    for cells, node, (start, end) in zip(body, built.nodes, RANGES):
        assert cells[:6] == [node.fingerprint, f"[{start},{end})", ",".join(PHASES), str(steps), f"0..{steps - 1}",
                             str(built.tokens[node.fingerprint])]  # fmt: skip
    assert sum(float(cells[7].rstrip("%")) for cells in body) == pytest.approx(100.0, abs=0.2)
    assert lines[4].startswith(f"total: 3 nodes, {3 * steps} attested steps, {sum(built.tokens.values())} tokens")


def test_who_filters(run):
    run_dir, built = run
    result = swarm_audit("who", run_dir, "--phase", "safety", "--block", "4")
    assert result.returncode == 0
    assert built.nodes[2].fingerprint in result.stdout and built.nodes[0].fingerprint not in result.stdout
    assert "100.0%" in result.stdout and "4..7" in result.stdout
    assert swarm_audit("who", run_dir, "--phase", "nope").stdout.strip() == "no attestations match"


def test_proof_checks_standalone_and_a_doctored_one_fails(run, tmp_path):
    run_dir, built = run
    index = built.attestations[10]
    result = swarm_audit("proof", run_dir, index)
    assert result.returncode == 0
    proof = json.loads(result.stdout)
    assert proof["leaf_index"] == index and proof["tree_size"] == built.entries and proof["audit_path"]
    path = tmp_path / "proof.json"
    path.write_text(result.stdout)
    (run_dir / "audit.db").unlink()  # the proof stands alone
    checked = swarm_audit("check-proof", path, "--coordinator", built.coordinator.fingerprint)
    assert checked.returncode == 0 and f"proof OK: entry {index}" in checked.stdout
    proof["audit_path"][0] = "00" * 32
    path.write_text(json.dumps(proof))
    doctored = swarm_audit("check-proof", path)
    assert doctored.returncode == 1 and "audit path does not lead" in doctored.stdout


def test_proof_of_a_bad_index_or_an_unsigned_entry_exits_2(run, tmp_path):
    run_dir, built = run
    result = swarm_audit("proof", run_dir, 9999)
    assert result.returncode == 2 and "entry 9999 is not in" in result.stderr
    with AuditLog.open(built.path, built.coordinator) as log:
        log.append_event("checkpoint", path="adapter-2/")
    result = swarm_audit("proof", run_dir, built.entries)
    assert result.returncode == 2 and "newer than the latest signed tree head" in result.stderr
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = swarm_audit("check-proof", garbage)
    assert result.returncode == 2 and "is not JSON" in result.stderr
    assert swarm_audit("check-proof", tmp_path / "absent.json").returncode == 2


def test_export_jsonl_to_stdout_and_to_a_file(run, tmp_path):
    run_dir, built = run
    result = swarm_audit("export", run_dir, "--jsonl")
    assert result.returncode == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == built.entries + len(built.head_sizes)
    assert records[0]["kind"] == "job_start" and records[-1]["record"] == "tree_head"
    out = tmp_path / "audit.jsonl"
    result = swarm_audit("export", run_dir, "--jsonl", "--out", out)
    assert result.returncode == 0
    assert out.read_text() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    assert swarm_audit("export", run_dir).returncode == 2  # --jsonl is required
