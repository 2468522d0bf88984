"""The live status page in a real browser: a 3-node job seen through headless Chromium, then a node killed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from coordinator.run_dir import read_metrics
from tests.conftest import write_job
from tests.coordinator.test_status import assert_snapshot_schema
from tests.integration.helpers import finish, read_until

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (`apt-get install chromium`; "
                                                         ".ci/run installs it where apt is available)")
BLOCKS = 6  # llama-micro
HEARTBEAT_S = 1.0


def _chromium(*args: str, timeout: float = 90) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               "--no-first-run", "--user-data-dir=" + os.environ.get("TMPDIR", "/tmp") + f"/chromium-{os.getpid()}",
               *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(url: str) -> str:
    """The page's DOM after its script fetched and drew a snapshot (virtual time runs the timers)."""
    return _chromium("--virtual-time-budget=4000", "--dump-dom", url)


def page_nodes(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-node="([0-9a-f]{16})" data-state="(\w+)"', dom))


def page_coverage(dom: str) -> dict[int, bool]:
    cells = re.findall(r'data-block="(\d+)" data-covered="([01])"', dom)
    return {int(block): covered == "1" for block, covered in cells}


def page_step(dom: str) -> int:
    return int(re.search(r'id="step" data-value="(\d+)"', dom).group(1))


def snapshot(url: str) -> dict:
    with urllib.request.urlopen(url + "api/status", timeout=10) as reply:
        return json.loads(reply.read())


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} within {timeout} s")


def local_node_pid(coordinator_pid: int, log_path: Path) -> int:
    """The local node process the coordinator started that writes to this log file: a child of the coordinator
    or of its node fork server (a forked node's command line does not carry its arguments; its stdout does go
    to its log)."""
    parents, logs = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            logs[int(entry.name)] = os.readlink(entry / "fd" / "1")
        except (OSError, IndexError, ValueError):
            continue
    for pid, stdout in logs.items():
        if stdout == str(log_path) and coordinator_pid in (parents.get(pid), parents.get(parents.get(pid))):
            return pid
    raise AssertionError(f"no process of coordinator {coordinator_pid} writes to {log_path}")


def test_status_page_shows_the_swarm_advancing_and_a_killed_node_down(tmp_path, processes):
    job_file = write_job(tmp_path, training={"steps": 2000, "batch_size": 4, "micro_batches": 2},
                         swarm={"min_nodes": 3, "heartbeat_interval_s": HEARTBEAT_S, "rpc_timeout_s": 20,
                                "checkpoint_every": 0})
    run_dir = tmp_path / "run"
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--run-dir",
                            str(run_dir), "--no-progress", "--no-baseline", "--node-threads", "1",
                            "--status-linger", "120")
    match, _ = read_until(coordinator, r"status page: (http://127\.0\.0\.1:\d+/)", timeout=60)
    url = match.group(1)
    wait_for(lambda: snapshot(url)["progress"]["step"] >= 2, 180, "training did not start")

    first = dump_dom(url)
    nodes = page_nodes(first)
    assert len(nodes) == 3 and set(nodes.values()) == {"up"}, nodes
    assert page_coverage(first) == {block: True for block in range(BLOCKS)}
    assert "all 6 blocks covered" in first
    _chromium("--virtual-time-budget=4000", "--window-size=1280,1400", f"--screenshot={tmp_path / 'status.png'}", url)
    assert (tmp_path / "status.png").stat().st_size > 10_000
    time.sleep(2)
    second = dump_dom(url)
    assert page_step(second) > page_step(first) >= 2

    # The page's figures are metrics.jsonl's: the last loss it shows is the file's row for that step.
    shown = re.search(r'id="last-loss" data-value="([^"]+)">last [\d.]+ at step (\d+)<', second)
    data = snapshot(url)
    # read after the page and the snapshot, which read the same file: training goes on, so it holds all they show
    rows = {row["step"]: row for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"}
    assert float(shown.group(1)) == rows[int(shown.group(2))]["loss"]
    assert_snapshot_schema(data)
    assert all(row["loss"] == rows[row["step"]]["loss"] for row in data["metrics"]["train"])
    assert data["heartbeat"]["timeout_s"] == 3 * HEARTBEAT_S

    victim_id = re.search(r"node identity ([0-9a-f]{16})", (run_dir / "nodes" / "node-1.log").read_text()).group(1)
    victim = local_node_pid(coordinator.pid, run_dir / "nodes" / "node-1.log")
    blocks = next(node["blocks"] for node in data["nodes"] if node["node_id"] == victim_id)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    # Down once its last heartbeat is older than the timeout; the slack covers fetching the JSON on a busy machine.
    slack = 2.5
    wait_for(lambda: {n["node_id"]: n["state"] for n in snapshot(url)["nodes"]}[victim_id] == "down",
             data["heartbeat"]["timeout_s"] + slack, "the JSON endpoint did not mark the killed node down", interval=0.1)
    assert time.monotonic() - killed <= data["heartbeat"]["timeout_s"] + slack
    after = dump_dom(url)
    assert page_nodes(after)[victim_id] == "down"
    coverage = page_coverage(after)
    assert [block for block, covered in coverage.items() if not covered] == list(range(*blocks))
    _chromium("--virtual-time-budget=4000", "--window-size=1280,1400", f"--screenshot={tmp_path / 'down.png'}", url)

    # Without step checkpoints (checkpoint_every: 0) no node can take over a range that lost its only node, so
    # the job fails (test_takeover covers the takeover); the page keeps answering and says so.
    failed = wait_for(lambda: (s := snapshot(url))["progress"]["state"] == "failed" and s, 120, "the job did not fail")
    assert failed["progress"]["failure"]
    assert page_nodes(dump_dom(url))[victim_id] == "down"
    coordinator.send_signal(signal.SIGTERM)  # ends the linger
    code, output = finish(coordinator, timeout=60)
    assert code != 0 and "Traceback" not in output

    # The finished (failed) run, from its directory alone: TensorBoard has metrics.jsonl's losses, and
    # `report` renders a page that still shows the dead node and its uncovered blocks.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in rows]
    code, output = finish(processes("-m", "coordinator.cli", "report", str(run_dir)), timeout=120)
    assert code == 0, output
    report = (run_dir / "status.html").read_text()
    embedded = json.loads(report.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert {n["node_id"]: n["state"] for n in embedded["nodes"]}[victim_id] == "down"
    assert embedded["blocks"]["uncovered"] == list(range(*blocks))
    assert embedded["progress"]["step"] == len(rows)
