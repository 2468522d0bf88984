"""Warm local nodes (node.warm_start via coordinator.local_nodes): a warm process takes its `swarm-node`
arguments and log file from stdin and runs as swarm-node; one closed without them exits quietly; one that died
warming up is replaced by a freshly started node. Real processes; each imports what a node imports."""

from __future__ import annotations

import subprocess
import sys

from coordinator import local_nodes
from tests.conftest import REPO

BAD_PIN = ["join", "--coordinator", "127.0.0.1:9", "--coordinator-key", "not-hex"]  # refused before any network


def test_a_warm_node_runs_the_arguments_it_is_handed_and_writes_to_its_log(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    local_nodes.prewarm(1)
    log = tmp_path / "node-0.log"
    log.write_text("from the crashed run\n")
    process = local_nodes._start_node(BAD_PIN, log)
    assert process.wait(timeout=120) == 2
    text = log.read_text()
    assert text.startswith("from the crashed run\n")  # appended
    assert "swarm-node: error: coordinator key not-hex: expected 16 to 64 hex digits" in text


def test_a_warm_node_closed_without_arguments_exits_quietly():
    process = subprocess.run([sys.executable, "-m", "node.warm_start"], input=b"", capture_output=True,
                             cwd=REPO, timeout=120)
    assert process.returncode == 0 and process.stdout == b"" and process.stderr == b""


def test_a_warm_node_that_died_is_replaced_by_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    local_nodes.prewarm(1)
    dead = local_nodes._WARM[0]
    dead.kill()
    dead.wait()
    log = tmp_path / "node-0.log"
    process = local_nodes._start_node(BAD_PIN, log)
    assert process is not dead and not local_nodes._WARM
    assert process.args[1:4] == ["-m", "node.cli", "join"]
    assert process.wait(timeout=120) == 2 and "swarm-node: error: coordinator key not-hex" in log.read_text()


def test_warm_nodes_no_run_took_are_killed(monkeypatch):
    monkeypatch.chdir(REPO)
    local_nodes.prewarm(2)
    warm = list(local_nodes._WARM)
    local_nodes.discard_warm()
    assert not local_nodes._WARM and all(process.returncode is not None for process in warm)
