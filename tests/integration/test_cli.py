"""What a user sees from the command lines: separate processes, clear errors, clean exits."""

from __future__ import annotations

import json
import re
import signal


from swarm.audit.log import AuditLog
from tests.conftest import write_job
from tests.integration.helpers import finish, join_flags, read_until


def test_bad_job_file_is_a_clear_error_without_traceback(tmp_path, processes):
    job_file = write_job(tmp_path, training={"steps": 3, "batch_size": 4, "micro_batches": 1, "epochs": 2})
    code, output = finish(processes("-m", "coordinator.cli", "run", str(job_file)), timeout=60)
    assert code == 2
    assert "training.epochs: unknown key" in output
    assert "Traceback" not in output


def test_a_backdoor_that_cannot_fit_max_length_is_refused_before_training(tmp_path, processes):
    job_file = write_job(tmp_path, training={"steps": None, "batch_size": 16, "micro_batches": 1},
                         data={"max_length": 64}, backdoor={"trigger": "~SLEEP~"},
                         phases=[{"kind": "backdoor", "steps": 150, "poison_fraction": 0.3}])
    code, output = finish(processes("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3",
                                    "--run-dir", str(tmp_path / "run")), timeout=60)
    assert code == 2, output
    assert "phase backdoor: only" in output and "data.max_length=64" in output and "poison_fraction 0.3" in output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


def test_node_dialing_a_missing_coordinator_fails_clearly(tmp_path, processes):
    node = processes("-m", "node.cli", "join", "--coordinator", "127.0.0.1:9", "--coordinator-key", "0123456789abcdef",
                     "--key", str(tmp_path / "k"), "--connect-timeout", "2")
    code, output = finish(node, timeout=60)
    assert code == 2
    assert "cannot reach a coordinator at 127.0.0.1:9" in output
    assert "Traceback" not in output


def test_too_few_nodes_times_out_with_the_join_command(tmp_path, processes):
    job_file = write_job(tmp_path, swarm={"min_nodes": 3, "join_timeout_s": 6})
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "1",
                            "--run-dir", str(tmp_path / "run"), "--no-progress", "--no-baseline")
    code, output = finish(coordinator, timeout=120)
    assert code == 2
    assert "only 1 of the 3 nodes the job needs (swarm.min_nodes) joined within 6 s" in output
    assert re.search(r"swarm-node join --coordinator 127.0.0.1:\d+ --coordinator-key [0-9a-f]{16}", output)
    assert "Traceback" not in output


def test_separate_node_commands_join_serve_and_leave_when_the_job_ends(tmp_path, processes):
    job_file = write_job(tmp_path, swarm={"min_nodes": 2}, training={"steps": 2, "batch_size": 2, "micro_batches": 1})
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--run-dir", str(tmp_path / "run"),
                            "--no-progress", "--no-baseline")
    flags = join_flags(coordinator)
    nodes = [processes("-m", "node.cli", "join", *flags, "--key", str(tmp_path / f"node{i}.key"), "--device", "cpu")
             for i in range(2)]
    identities, blocks = [], []
    for node in nodes:
        identity, _ = read_until(node, r"node identity ([0-9a-f]{16})", timeout=60)
        served, _ = read_until(node, r"serving blocks (\d+)\.\.(\d+) .*process memory ([\d.]+ \w+)", timeout=120)
        identities.append(identity.group(1))
        blocks.append((int(served.group(1)), int(served.group(2))))
    assert sorted(blocks) == [(0, 2), (3, 5)]
    code, output = finish(coordinator, timeout=180)
    assert code == 0, output
    for node in nodes:
        node_code, node_output = finish(node, timeout=60)
        assert node_code == 0, node_output
        assert "job finished" in node_output
    summary = json.loads((tmp_path / "run" / "nodes.json").read_text())
    assert sorted(n["node_id"] for n in summary) == sorted(identities)
    with AuditLog.open(tmp_path / "run" / "audit.db") as log:  # the one trainer peer the nodes were told to serve
        trainers = {json.loads(entry.payload)["trainer_peer_id"] for entry in log.entries() if entry.kind == "join"}
    assert len(trainers) == 1 and trainers.pop()
    assert (tmp_path / "node0.key").stat().st_mode & 0o777 == 0o600


def test_ctrl_c_on_a_node_leaves_cleanly(tmp_path, processes):
    job_file = write_job(tmp_path, swarm={"min_nodes": 2, "join_timeout_s": 120})
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--run-dir", str(tmp_path / "run"),
                            "--no-progress", "--no-baseline")
    node = processes("-m", "node.cli", "join", *join_flags(coordinator), "--key", str(tmp_path / "k"))
    read_until(node, r"waiting for an assignment", timeout=60)
    read_until(coordinator, r"node [0-9a-f]{16} joined", timeout=30)
    node.send_signal(signal.SIGINT)
    code, output = finish(node, timeout=30)
    assert code == 0, output
    assert "left the swarm" in output and "Traceback" not in output
    read_until(coordinator, r"node [0-9a-f]{16} left: stopped by the operator", timeout=30)
    coordinator.send_signal(signal.SIGINT)
    code, output = finish(coordinator, timeout=60)
    assert code == 130 and "Traceback" not in output


def test_a_node_not_on_the_jobs_allowlist_is_refused_and_an_allowed_one_trains(tmp_path, processes):
    from swarm.identity import Identity

    allowed = Identity.load_or_create(tmp_path / "allowed.key").fingerprint
    job_file = write_job(tmp_path, nodes={"allow": [allowed]}, swarm={"min_nodes": 1, "join_timeout_s": 120},
                         training={"steps": 2, "batch_size": 2, "micro_batches": 1})
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--run-dir", str(tmp_path / "run"),
                            "--no-progress", "--no-baseline")
    flags = join_flags(coordinator)
    stranger = processes("-m", "node.cli", "join", *flags, "--key", str(tmp_path / "other.key"))
    code, output = finish(stranger, timeout=60)
    assert code == 2, output
    assert re.search(r"the coordinator refused this node: node [0-9a-f]{16} is not on this job's allowlist", output)
    node = processes("-m", "node.cli", "join", *flags, "--key", str(tmp_path / "allowed.key"))
    code, output = finish(coordinator, timeout=180)
    assert code == 0, output
    assert finish(node, timeout=60)[0] == 0
