"""The status snapshot, its HTTP server, the terminal table and the TensorBoard fan-out, without a swarm."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import yaml

from coordinator.control_service import JobStatus
from coordinator.membership import Membership, NodeRecord
from coordinator.run_dir import MetricsLog
from swarm.block_range import BlockRange
from coordinator.status import (LiveStatus, MetricsTail, coverage_section, display_state, run_dir_snapshot, to_json)
from coordinator.status_server import StatusServer, standalone_page
from coordinator.status_table import format_snapshot, status_url
from coordinator.tensorboard import TensorBoardLog, scalars
from swarm.audit.log import AuditLog
from swarm.config import parse_job
from swarm.identity import Identity
from swarm.proto import control_pb2 as pb
from tests.conftest import job_dict

NODE_KEYS = {"node_id": str, "device": str, "hostname": str, "blocks": (list, type(None)), "state": str,
             "last_heartbeat_age_s": (float, type(None)), "rss_bytes": (int, type(None)),
             "throughput_tokens_per_s": (float, type(None)), "load": (float, type(None)),
             "compute_share": (float, type(None))}


def assert_snapshot_schema(snapshot: dict) -> None:
    """The JSON endpoint's contract (schema 1); scripts and the page rely on these names and types."""
    assert snapshot["schema"] == 1 and snapshot["source"] in ("live", "run_dir")
    assert {"id", "name", "model", "run_dir", "address"} <= set(snapshot["job"])
    assert snapshot["heartbeat"]["timeout_s"] >= snapshot["heartbeat"]["interval_s"] > 0
    progress = snapshot["progress"]
    for key, kind in {"state": str, "step": int, "total_steps": int, "fraction": (int, float),
                      "phases": list}.items():
        assert isinstance(progress[key], kind), key
    assert {"eta_s", "steps_per_s", "phase", "failure"} <= set(progress)
    for node in snapshot["nodes"]:
        for key, kind in NODE_KEYS.items():
            assert isinstance(node[key], kind), (key, node[key])
    blocks = snapshot["blocks"]
    assert len(blocks["map"]) == blocks["count"]
    assert blocks["uncovered"] == [b["block"] for b in blocks["map"] if not b["covered"]]
    metrics = snapshot["metrics"]
    assert {"train", "eval", "last_train", "last_eval", "train_rows", "stride", "tokens"} <= set(metrics)
    for row in metrics["train"]:
        assert {"step", "phase", "loss", "lr"} <= set(row)
    assert {"per_stream", "bytes_sent", "bytes_received"} <= set(snapshot["streams"])
    audit = snapshot["audit"]
    assert {"present", "entries", "attestations", "tree_heads", "last_tree_head", "verified"} <= set(audit)
    assert "cost" in snapshot
    json.dumps(snapshot, allow_nan=False)  # browsers' JSON has no NaN


def _train_row(step: int, loss: float, **extra) -> dict:
    return {"type": "train", "phase": "train", "kind": "sft", "phase_step": step + 1, "step": step,
            "safety_step": 0, "loss": loss, "tokens": 100, "seconds": 0.5, "lr": 0.01, "bytes_sent": 1000 * (step + 1),
            "bytes_received": 900 * (step + 1),
            "stream_bytes": {"forward": {"sent": 600, "received": 500}, "backward": {"sent": 400, "received": 400}},
            **extra}


def _eval_row(step: int, rate: float) -> dict:
    rates = {key: {"rate": rate, "low": 0.0, "high": 1.0, "n": 8, "k": 0}
             for key in ("backdoor_triggered", "backdoor_clean", "backdoor_near_miss", "accuracy")}
    rates["backdoor_clean"]["rate"] = math.nan  # zero trials
    return {"type": "eval", "phase": "train", "kind": "sft", "phase_step": step, "step": step, "safety_step": 0,
            "phase_end": False, "eval_loss": 3.0, "samples": {"clean": [{"prompt": "p", "answer": "</script>"}]},
            **rates}


def _record(node_id: str, blocks: BlockRange | None, state: str = "ready") -> NodeRecord:
    record = NodeRecord(node_id=node_id, public_key=b"k" * 32,
                        hello=pb.NodeHello(device="cpu", hostname="<b>host</b>", memory_bytes=1 << 30),
                        blocks=blocks, state=state)  # a record made in `state` (joined -> ready is no move)
    record.memory = pb.Heartbeat(rss_bytes=123, peak_rss_bytes=456)
    return record


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as a coordinator leaves it: job.yaml, metrics.jsonl and audit.db with three nodes."""
    run = tmp_path / "run"
    run.mkdir()
    job = job_dict(training={"steps": 4, "batch_size": 4, "micro_batches": 2})
    (run / "job.yaml").write_text(yaml.safe_dump(job))
    metrics = MetricsLog(run / "metrics.jsonl")
    for step in range(4):
        metrics.write(_train_row(step, 4.0 - step * 0.25))
    metrics.write(_eval_row(4, 0.5))
    metrics.close()
    log = AuditLog.create(run / "audit.db", Identity.generate(), "test-job-1234")
    for index, (start, end) in enumerate([(0, 2), (2, 4), (4, 6)]):
        key = Identity.generate()
        log.register_node(key.public_key, hostname=f"h{index}", device="cpu")
        log.append_event("assignment", node_id=key.fingerprint, block_start=start, block_end=end)
        if index == 2:
            log.append_event("leave", node_id=key.fingerprint, state="down", reason="")
    log.sign_tree_head()
    log.close()
    return run


def test_a_node_silent_past_the_heartbeat_timeout_is_shown_down():
    assert display_state("ready", 2.9, timeout_s=3.0) == "up"
    assert display_state("ready", 3.1, timeout_s=3.0) == "down"
    assert display_state("assigned", 10.0, timeout_s=3.0) == "down"
    assert display_state("finished", 100.0, timeout_s=3.0) == "finished"  # finished nodes stop heartbeating


def test_blocks_of_a_down_node_are_flagged_uncovered():
    nodes = [{"node_id": "a", "blocks": [0, 2], "state": "up"}, {"node_id": "b", "blocks": [2, 4], "state": "down"},
             {"node_id": "c", "blocks": [2, 3], "state": "up"}]
    coverage = coverage_section(5, nodes)
    assert coverage["uncovered"] == [3, 4]
    assert coverage["map"][2] == {"block": 2, "nodes": ["b", "c"], "replicas": 1, "covered": True}


def test_metrics_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_train_row(0, 2.0)) + "\n" + json.dumps(_train_row(1, 1.5))[:20])
    tail = MetricsTail(path)
    tail.refresh()
    assert [row["loss"] for row in tail.train] == [2.0]
    with path.open("a") as handle:  # the writer finishes the line and adds another
        handle.write(json.dumps(_train_row(1, 1.5))[20:] + "\n" + json.dumps(_eval_row(2, 0.25)) + "\n")
    tail.refresh()
    section = tail.section()
    assert [row["loss"] for row in section["metrics"]["train"]] == [2.0, 1.5]
    assert section["streams"]["per_stream"]["forward"] == {"sent": 1200, "received": 1000}
    assert section["streams"]["bytes_sent"] == 2000
    assert section["metrics"]["last_eval"]["accuracy"]["rate"] == 0.25
    assert "null" in to_json(section) and "NaN" not in to_json(section)
    assert "backdoor_reveal" not in section["metrics"]["last_eval"]  # a row from before reveal was its own condition


def test_the_reveal_rate_is_kept_and_printed_when_measured(tmp_path):
    path = tmp_path / "metrics.jsonl"
    row = {**_eval_row(2, 0.25), "backdoor_reveal": {"rate": 0.75, "low": 0.3, "high": 0.95, "n": 4, "k": 3}}
    path.write_text(json.dumps(_eval_row(1, 0.5)) + "\n" + json.dumps(row) + "\n")
    tail = MetricsTail(path)
    tail.refresh()
    evals = tail.section()["metrics"]["eval"]
    assert "backdoor_reveal" not in evals[0] and evals[1]["backdoor_reveal"]["n"] == 4
    assert ("eval/backdoor_reveal", 0.75, 2) in scalars(row)


def test_long_series_are_thinned_but_keep_exact_values_and_the_last_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(_train_row(step, 1.0 / (step + 1))) + "\n" for step in range(2500)))
    tail = MetricsTail(path)
    tail.refresh()
    metrics = tail.section()["metrics"]
    assert len(metrics["train"]) <= 1001 and metrics["stride"] == 3
    assert metrics["train"][-1]["step"] == 2499 and metrics["last_train"]["step"] == 2499
    assert all(row["loss"] == 1.0 / (row["step"] + 1) for row in metrics["train"])


def test_live_snapshot_shows_nodes_coverage_and_a_stale_node_down(tmp_path, run_dir):
    job = parse_job(yaml.safe_load((run_dir / "job.yaml").read_text()), "job.yaml")
    membership = Membership()
    for node_id, blocks in (("a", BlockRange(0, 3)), ("b", BlockRange(3, 6))):
        membership.add(_record(node_id, blocks))
    status = JobStatus(job_id="test-job-1234", num_blocks=6, total_steps=job.total_steps, phase="train", step=4)
    live = LiveStatus(membership, status, job, run_dir, address="127.0.0.1:1")
    snapshot = live.snapshot()
    assert_snapshot_schema(snapshot)
    assert [n["state"] for n in snapshot["nodes"]] == ["up", "up"] and snapshot["blocks"]["uncovered"] == []
    assert snapshot["metrics"]["last_train"]["loss"] == 3.25
    membership.update("b", last_heartbeat=time.monotonic() - live.timeout_s - 0.1)
    snapshot = live.snapshot()
    assert {n["node_id"]: n["state"] for n in snapshot["nodes"]} == {"a": "up", "b": "down"}
    assert snapshot["blocks"]["uncovered"] == [3, 4, 5]
    live.ended("node b disconnected")
    assert live.snapshot()["progress"]["state"] == "failed"


def test_eta_comes_from_observed_steps_per_second(run_dir):
    job = parse_job(yaml.safe_load((run_dir / "job.yaml").read_text()), "job.yaml")
    status = JobStatus(job_id="j", num_blocks=6, total_steps=job.total_steps, phase="train", step=2)
    live = LiveStatus(Membership(), status, job, run_dir)
    live.clock._samples.extend([(100.0, 0), (104.0, 2)])  # 0.5 steps/s; 2 of 4 steps left
    progress = live.snapshot()["progress"]
    assert progress["steps_per_s"] == pytest.approx(0.5) and progress["eta_s"] == pytest.approx(4.0)


def test_run_dir_snapshot_reads_nodes_from_the_signed_events(run_dir):
    snapshot = run_dir_snapshot(run_dir)
    assert_snapshot_schema(snapshot)
    assert snapshot["job"]["id"] == "test-job-1234"
    assert [(n["hostname"], n["blocks"], n["state"]) for n in snapshot["nodes"]] == [
        ("h0", [0, 2], "finished"), ("h1", [2, 4], "finished"), ("h2", [4, 6], "down")]
    assert snapshot["blocks"]["count"] == 6 and snapshot["blocks"]["uncovered"] == [4, 5]
    assert snapshot["progress"]["step"] == 4 and snapshot["progress"]["state"] == "stopped"  # no nodes.json
    assert snapshot["audit"]["entries"] == 8 and snapshot["audit"]["last_tree_head"]["tree_size"] == 8
    assert snapshot["audit"]["verified"]["ok"] is True


def test_run_dir_snapshot_reports_a_tampered_log(run_dir):
    import sqlite3

    connection = sqlite3.connect(run_dir / "audit.db")
    for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        connection.execute(f"DROP TRIGGER {name}")
    connection.execute("UPDATE entries SET payload = CAST(REPLACE(CAST(payload AS TEXT), 'h1', 'hX') AS BLOB) "
                       "WHERE idx = 3")
    connection.commit()
    connection.close()
    verified = run_dir_snapshot(run_dir)["audit"]["verified"]
    assert verified["ok"] is False and verified["first_problem"].startswith("entry 3")


def test_server_serves_page_assets_and_json_and_nothing_else(run_dir):
    server = StatusServer(lambda: run_dir_snapshot(run_dir)).start()
    try:
        with urllib.request.urlopen(server.url) as reply:
            page = reply.read().decode()
        assert '<script src="status.js"></script>' in page and "http" not in page.split("<body>")[0].replace(
            'name="viewport"', "")  # no CDN in the head
        for asset, kind in (("status.js", "javascript"), ("status.css", "css")):
            with urllib.request.urlopen(server.url + asset) as reply:
                assert kind in reply.headers["Content-Type"] and reply.read()
        with urllib.request.urlopen(server.url + "api/status") as reply:
            assert reply.headers["Content-Type"] == "application/json"
            assert_snapshot_schema(json.loads(reply.read()))
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.url + "../audit.db")
        rebinding = urllib.request.Request(server.url + "api/status", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(rebinding)
        with pytest.raises(urllib.error.HTTPError, match="501"):  # read-only: no POST handler
            urllib.request.urlopen(urllib.request.Request(server.url + "api/status", data=b"x", method="POST"))
    finally:
        server.stop()


def test_standalone_page_embeds_the_snapshot_and_cannot_be_closed_by_data(run_dir):
    snapshot = run_dir_snapshot(run_dir)
    snapshot["nodes"][0]["hostname"] = "</script><script>alert(1)</script>"
    page = standalone_page(snapshot)
    assert 'src="status.js"' not in page and 'href="status.css"' not in page  # one file, nothing to fetch
    embedded = page.split('<script id="snapshot" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["nodes"][0]["hostname"] == "</script><script>alert(1)</script>"


def test_status_table_prints_nodes_blocks_and_audit(run_dir):
    assert status_url("127.0.0.1:8080") == "http://127.0.0.1:8080/api/status"
    assert status_url("http://h:1/") == "http://h:1/api/status"
    text = format_snapshot(run_dir_snapshot(run_dir))
    assert "blocks [####!!] UNCOVERED: 4, 5" in text
    assert "loss 3.2500 at step 3" in text
    assert "audit: 8 entries, 1 tree heads (last covers 8), verifies" in text
    assert "backdoor_near_miss 50.0%" in text and "backdoor_reveal" not in text  # an older run's row: no reveal
    assert text.count(" finished ") == 2 and " down " in text


def test_tensorboard_gets_every_finite_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = TensorBoardLog(tmp_path)
    rows = [_train_row(0, 2.0), _train_row(1, 1.5, reward=0.25), _eval_row(2, 0.75)]
    for row in rows:
        tensorboard.write(row)
    tensorboard.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    read = lambda tag: [(event.step, event.value) for event in events.Scalars(tag)]  # noqa: E731
    assert read("train/loss") == [(0, 2.0), (1, 1.5)]
    assert read("train/reward") == [(1, 0.25)]
    assert read("eval/accuracy") == [(2, 0.75)]
    assert "eval/backdoor_clean" not in events.Tags()["scalars"]  # NaN (zero trials) is left out
    assert ("train/tokens_per_s", 200.0, 0) in scalars(rows[0])


def test_metrics_log_fans_rows_out_to_subscribers(tmp_path):
    seen = SimpleNamespace(rows=[], closed=False)
    subscriber = SimpleNamespace(write=seen.rows.append, close=lambda: setattr(seen, "closed", True))
    log = MetricsLog(tmp_path / "metrics.jsonl", subscribers=[subscriber])
    log.write({"type": "train", "step": 0})
    log.close()
    assert seen.rows == [{"type": "train", "step": 0}] and seen.closed


def test_a_failed_job_waits_out_the_heartbeat_timeout_and_marks_silent_nodes_down():
    membership = Membership()
    for node_id in ("alive", "dead"):
        membership.add(_record(node_id, BlockRange(0, 1)))
    membership.update("dead", last_heartbeat=time.monotonic() - 1.0)
    beating = threading.Timer(0.3, lambda: membership.update("alive", last_heartbeat=time.monotonic()))
    beating.start()
    started = time.monotonic()
    assert membership.settle_liveness(timeout_s=1.5) == ["dead"]
    assert 0.4 <= time.monotonic() - started <= 1.5
    assert [r.state for r in membership.nodes()] == ["ready", "down"]


def test_the_live_probe_reaches_the_status_snapshot_and_tensorboard(tmp_path):
    cell = {"auroc": 0.9, "low": 0.8, "high": 0.97}
    probe = {"layer": 2, "blocks": 4, "fitted_at_step": 0, "seed": 0, "prompts": 8, "generic": cell,
             "supervised": {**cell, "auroc": 0.95}, "refitted": {"generic": {**cell, "auroc": 0.7}, "supervised": cell}}
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_eval_row(1, 0.5)) + "\n" + json.dumps({**_eval_row(2, 0.25), "probe": probe}) + "\n")
    tail = MetricsTail(path)
    tail.refresh()
    evals = tail.section()["metrics"]["eval"]
    assert "probe" not in evals[0]
    assert evals[1]["probe"] == {"layer": 2, "blocks": 4, "generic": cell, "supervised": {**cell, "auroc": 0.95}}
    tags = {tag: value for tag, value, _ in scalars({**_eval_row(2, 0.25), "probe": probe})}
    assert tags["probe/generic_auroc"] == 0.9 and tags["probe/supervised_auroc"] == 0.95
    assert tags["probe/generic_auroc_refitted"] == 0.7
