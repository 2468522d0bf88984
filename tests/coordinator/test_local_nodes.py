"""Local nodes forked by the node fork server (node.fork_server via coordinator.node_forks and local_nodes): a
forked node runs the `swarm-node` arguments it is handed, appends to its log, and is followed like a subprocess
(exit codes, signals, timeouts); one server forks many; a server closed without orders exits quietly; when the
server is gone a node starts fresh, and a node whose server died is still followed by its pid. Real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import local_nodes
from coordinator.node_forks import LOST_EXIT_CODE, NodeForkServer
from tests.conftest import REPO

BAD_PIN = ["join", "--coordinator", "127.0.0.1:9", "--coordinator-key", "not-hex"]  # refused before any network
# dials a coordinator that is not there for two minutes: a node that runs until it is stopped
WAITING = ["join", "--coordinator", "127.0.0.1:9", "--coordinator-key", "0123456789abcdef", "--connect-timeout", "120"]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.chdir(REPO)
    server = NodeForkServer()
    yield server
    server.close()


def test_a_forked_node_runs_the_arguments_it_is_handed_and_appends_to_its_log(tmp_path, server):
    log = tmp_path / "node-0.log"
    log.write_text("from the crashed run\n")
    node = server.fork(BAD_PIN, log)
    assert node.pid != server.process.pid
    assert node.wait(timeout=300) == 2 and node.poll() == 2
    text = log.read_text()
    assert text.startswith("from the crashed run\n")  # appended
    assert "swarm-node: error: coordinator key not-hex: expected 16 to 64 hex digits" in text


def test_one_server_forks_many_nodes_each_followed_on_its_own(tmp_path, server):
    waiting = server.fork([*WAITING, "--key", str(tmp_path / "a.key")], tmp_path / "a.log")
    refused = server.fork(BAD_PIN, tmp_path / "b.log")
    assert refused.wait(timeout=300) == 2
    assert waiting.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(timeout=0.5)
    waiting.send_signal(signal.SIGKILL)
    assert waiting.wait(timeout=60) == -signal.SIGKILL
    assert "swarm-node: error" not in (tmp_path / "a.log").read_text()


def test_a_forked_node_works_from_the_directory_of_whoever_ordered_it(tmp_path, server, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the server itself runs in the repository
    node = server.fork([*WAITING, "--key", "relative.key"], tmp_path / "a.log")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "relative.key").exists() and time.monotonic() < deadline and node.poll() is None:
            time.sleep(0.1)
        assert (tmp_path / "relative.key").exists(), (tmp_path / "a.log").read_text()
        assert os.readlink(f"/proc/{node.pid}/cwd") == str(tmp_path)
        assert Path(f"/proc/{node.pid}/comm").read_text() == "swarm-node\n"  # as ps and top show it
    finally:
        node.kill()
    assert node.wait(timeout=60) == -signal.SIGKILL


def test_a_node_whose_server_died_is_followed_by_its_pid(tmp_path, server):
    node = server.fork([*WAITING, "--key", str(tmp_path / "a.key")], tmp_path / "a.log")
    server.close()
    assert not server.alive() and node.poll() is None
    node.send_signal(signal.SIGKILL)
    assert node.wait(timeout=60) == LOST_EXIT_CODE


def test_a_server_closed_without_orders_exits_quietly():
    process = subprocess.run([sys.executable, "-m", "node.fork_server"], input=b"", capture_output=True,
                             cwd=REPO, timeout=300)
    assert process.returncode == 0 and process.stdout == b'{"ready": true}\n' and process.stderr == b""


def test_without_a_server_that_forks_a_node_starts_fresh(tmp_path, monkeypatch, server):
    server.close()
    monkeypatch.setattr(local_nodes, "fork_server", lambda: server)
    process = local_nodes._start_node(BAD_PIN, tmp_path / "node-0.log")
    assert isinstance(process, subprocess.Popen) and process.args[1:4] == ["-m", "node.cli", "join"]
    assert process.wait(timeout=300) == 2 and "coordinator key not-hex" in (tmp_path / "node-0.log").read_text()


def test_prewarm_starts_one_server_for_every_node_and_stop_fork_server_ends_it(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    local_nodes.prewarm(2)
    try:
        first = local_nodes._SERVER[0]
        nodes = [local_nodes._start_node(BAD_PIN, tmp_path / f"node-{i}.log") for i in range(2)]
        assert local_nodes._SERVER == [first] and all(node.wait(timeout=300) == 2 for node in nodes)
    finally:
        local_nodes.stop_fork_server()
    assert not local_nodes._SERVER and first.process.returncode is not None


def test_nodes_that_compute_in_turn_get_every_core_and_nodes_that_compute_at_once_share_them():
    assert local_nodes.node_threads(3, micro_batches=1, cpus=2) == 2  # one micro-batch: one node at a time
    assert local_nodes.node_threads(3, micro_batches=4, cpus=2) == 1
    assert local_nodes.node_threads(2, micro_batches=8, cpus=16) == 8
    assert local_nodes.node_threads(1, micro_batches=8, cpus=4) == 4


def test_local_nodes_are_started_with_the_threads_of_the_jobs_micro_batches(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(local_nodes, "_start_node", lambda argv, log, fork: started.append(argv))
    monkeypatch.setattr(local_nodes.os, "cpu_count", lambda: 4)
    local_nodes.LocalNodes(2, ["--coordinator", "127.0.0.1:9"], tmp_path, None, micro_batches=1)
    local_nodes.LocalNodes(2, ["--coordinator", "127.0.0.1:9"], tmp_path, None, micro_batches=2)
    local_nodes.LocalNodes(2, ["--coordinator", "127.0.0.1:9"], tmp_path, None, threads=3, micro_batches=2)
    threads = [argv[argv.index("--threads") + 1] for argv in started]
    assert threads == ["4", "4", "2", "2", "3", "3"]
