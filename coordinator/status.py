"""One JSON-able picture of a run, shared by the status page, its JSON endpoint, `status` and `report`.

Two sources build the same schema (`SCHEMA_VERSION`): `LiveStatus` reads a running coordinator's membership
and job status; `run_dir_snapshot` reads a run directory alone (job.yaml, metrics.jsonl, audit.db,
nodes.json), so a finished or crashed run can be shown later. Measurements come from metrics.jsonl only
(nothing computes the same figure twice, so the page, the CLI and the report cannot disagree); audit state
and cost shares come from audit.db through `swarm.audit.verify` and `coordinator.cost_share`, which are too
slow to run on every request and are refreshed in the background at most every `AUDIT_REFRESH_S` seconds.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path


from coordinator.membership import ACTIVE_STATES, heartbeat_timeout_s
from coordinator.run_dir import nan_to_null
from swarm.audit import db as audit_db
from swarm.audit.entry import ATTESTATION
from swarm.config import Job, load_job

SCHEMA_VERSION = 1
SERIES_POINTS = 1000  # at most this many training points per chart; every k-th row, the last one always
AUDIT_REFRESH_S = 10.0  # least time between two verifications of a growing log
AUDIT_BUSY_FRACTION = 0.2  # and at most this fraction of the time spent verifying (a big log takes seconds)
RATE_KEYS = ("backdoor_triggered", "backdoor_clean", "backdoor_near_miss", "accuracy")
TRAIN_KEYS = ("step", "phase", "kind", "phase_step", "safety_step", "loss", "lr", "tokens", "seconds", "reward")
SERVING = ("up", "finished")  # displayed states whose blocks count as covered


def display_state(state: str, heartbeat_age_s: float | None, timeout_s: float) -> str:
    """What the page shows: a node that should be heartbeating but has been silent too long is down."""
    if state in ACTIVE_STATES and heartbeat_age_s is not None and heartbeat_age_s > timeout_s:
        return "down"
    return {"ready": "up", "joined": "joining", "assigned": "loading"}.get(state, state)


def to_json(snapshot: dict) -> str:
    return json.dumps(nan_to_null(snapshot), allow_nan=False, separators=(",", ":"))


# ------------------------------------------------------------------------------------------ metrics.jsonl


class MetricsTail:
    """Reads metrics.jsonl incrementally (complete lines only), keeping what the page draws.

    A long run's file holds thousands of rows with example answers; re-parsing it on every request would cost
    more than the training step it reports on.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._lock = threading.Lock()
        self.train: list[dict] = []
        self.evals: list[dict] = []
        self.streams: dict[str, dict[str, int]] = {}
        self.last_train: dict | None = None

    def refresh(self) -> None:
        with self._lock:
            if not self.path.exists():
                return
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
            complete = data[:data.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                if line.strip():
                    self._add(json.loads(line))

    def _add(self, row: dict) -> None:
        if row.get("type", "train") == "train":
            self.train.append({key: row[key] for key in TRAIN_KEYS if key in row})
            self.last_train = row
            for stream, moved in (row.get("stream_bytes") or {}).items():
                total = self.streams.setdefault(stream, {"sent": 0, "received": 0})
                total["sent"] += moved.get("sent", 0)
                total["received"] += moved.get("received", 0)
        elif row.get("type") == "eval":
            kept = {key: row.get(key) for key in ("step", "phase", "kind", "phase_step", "safety_step", "phase_end",
                                                   "eval_loss")}
            for key in RATE_KEYS:
                if isinstance(row.get(key), dict):
                    kept[key] = {name: row[key].get(name) for name in ("rate", "low", "high", "n")}
            self.evals.append(kept)

    def section(self) -> dict:
        """The `metrics` and `streams` parts of a snapshot."""
        with self._lock:
            stride = max(1, math.ceil(len(self.train) / SERIES_POINTS))
            series = self.train[::stride]
            if self.train and series[-1] is not self.train[-1]:
                series.append(self.train[-1])
            last = self.last_train or {}
            return {
                "metrics": {
                    "train_rows": len(self.train),
                    "stride": stride,
                    "train": [dict(row) for row in series],
                    "eval": [dict(row) for row in self.evals],
                    "last_train": {key: last[key] for key in TRAIN_KEYS if key in last} or None,
                    "last_eval": dict(self.evals[-1]) if self.evals else None,
                    "tokens": sum(row.get("tokens", 0) for row in self.train),
                    "train_seconds": sum(row.get("seconds", 0.0) for row in self.train),
                },
                "streams": {
                    "per_stream": {name: dict(total) for name, total in sorted(self.streams.items())},
                    "bytes_sent": last.get("bytes_sent", 0),
                    "bytes_received": last.get("bytes_received", 0),
                },
            }


# -------------------------------------------------------------------------------------------- progress


class StepClock:
    """Steps observed against wall-clock time, for an ETA that includes evaluations and RL sampling."""

    WINDOW = 200

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=self.WINDOW)
        self.started = time.time()

    def observe(self, step: int) -> None:
        self._samples.append((time.monotonic(), step))

    def steps_per_s(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


def phases_section(job: Job, step: int) -> tuple[list[dict], dict | None]:
    """Every phase with its global step range, and the one step `step` falls in (None before or after)."""
    phases, first, current = [], 0, None
    for index, phase in enumerate(job.phase_list):
        row = {"index": index, "name": phase.name, "kind": phase.kind, "steps": phase.steps, "first_step": first}
        phases.append(row)
        if first <= step < first + phase.steps:
            current = row
        first += phase.steps
    return phases, current


def progress_section(job: Job, state: str, step: int, steps_per_s: float | None, failure: str | None) -> dict:
    phases, current = phases_section(job, step)
    total = job.total_steps
    remaining = max(0, total - step)
    eta = remaining / steps_per_s if steps_per_s and state == "train" else None
    return {
        "state": state, "step": step, "total_steps": total, "fraction": step / total if total else 0.0,
        "phase": current["name"] if current else None, "phase_kind": current["kind"] if current else None,
        "phase_step": step - current["first_step"] if current else None,
        "phase_steps": current["steps"] if current else None,
        "steps_per_s": steps_per_s, "eta_s": eta, "failure": failure, "phases": phases,
    }


def coverage_section(num_blocks: int, nodes: list[dict]) -> dict:
    """Which nodes serve each block; a block no serving node holds is uncovered."""
    blocks = []
    for block in range(num_blocks):
        holders = [n for n in nodes if n["blocks"] is not None and n["blocks"][0] <= block < n["blocks"][1]]
        serving = [n["node_id"] for n in holders if n["state"] in SERVING]
        blocks.append({"block": block, "nodes": [n["node_id"] for n in holders], "replicas": len(serving),
                       "covered": bool(serving)})
    return {"count": num_blocks, "map": blocks, "uncovered": [b["block"] for b in blocks if not b["covered"]]}


# ------------------------------------------------------------------------------------------- audit.db


class AuditWatch:
    """Cheap counts of audit.db on every call; verification and cost shares, which read the whole log,
    recomputed in a background thread when the log grew, at most every `refresh_s` seconds and rarer for a
    log so big that checking it takes more than `AUDIT_BUSY_FRACTION` of the time."""

    def __init__(self, run_dir: Path, refresh_s: float = AUDIT_REFRESH_S, background: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / audit_db.DB_NAME
        self.refresh_s, self.background = refresh_s, background
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._checked_at = 0.0
        self._checked_entries = -1
        self._took_s = 0.0
        self.verified: dict | None = None
        self.cost: dict | None = None

    def counts(self) -> dict:
        if not self.path.exists():
            return {"present": False, "entries": 0, "attestations": 0, "tree_heads": 0, "last_tree_head": None}
        connection = audit_db.connect_readonly(self.path)
        try:
            entries, attestations = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(kind = ?), 0) FROM entries", (ATTESTATION,)).fetchone()
            heads = audit_db.head_rows(connection)
        finally:
            connection.close()
        last = audit_db.head_from_row(heads[-1]) if heads else None
        return {
            "present": True, "entries": entries, "attestations": attestations, "tree_heads": len(heads),
            "last_tree_head": None if last is None else {
                "sequence": last.sequence, "tree_size": last.tree_size, "root_hash": last.root_hash.hex(),
                "timestamp_ms": last.timestamp_ms},
        }

    def read(self) -> tuple[dict, dict | None]:
        """(the snapshot's `audit` part, its `cost` part as last computed)."""
        try:
            counts = self.counts()
        except (sqlite3.Error, OSError, ValueError) as error:  # a log being created, or not an audit log
            counts = {"present": self.path.exists(), "entries": 0, "attestations": 0, "tree_heads": 0,
                      "last_tree_head": None, "error": str(error)}
        self._maybe_refresh(counts["entries"])
        with self._lock:
            return {**counts, "verified": self.verified, "refresh_s": self.refresh_s}, self.cost

    def _maybe_refresh(self, entries: int) -> None:
        with self._lock:
            busy = self._worker is not None and self._worker.is_alive()
            wait = max(self.refresh_s, self._took_s / AUDIT_BUSY_FRACTION)
            due = time.monotonic() - self._checked_at >= wait and entries != self._checked_entries
            if busy or not due or entries == 0:
                return
            self._checked_at, self._checked_entries = time.monotonic(), entries
            if self.background:
                self._worker = threading.Thread(target=self._refresh, name="status-audit", daemon=True)
                self._worker.start()
                return
        self._refresh()

    def refresh_soon(self) -> None:
        """Re-check at the next request that finds the log grown (the job just ended: show its final state)."""
        with self._lock:
            self._checked_at = 0.0

    def _refresh(self) -> None:
        started = time.monotonic()
        verified = _verify(self.path)
        cost = _cost(self.run_dir)
        with self._lock:
            self.verified, self.cost = verified, cost
            self._took_s = time.monotonic() - started


def _verify(path: Path) -> dict:
    from swarm.audit.errors import AuditError
    from swarm.audit.verify import verify_log

    try:
        report = verify_log(path)
    except (AuditError, sqlite3.Error, OSError) as error:
        return {"ok": False, "summary": str(error), "first_problem": str(error), "entries_checked": 0,
                "checked_at": time.time()}
    return {"ok": report.ok, "summary": report.summary(),
            "first_problem": str(report.first_bad) if report.first_bad else None,
            "entries_checked": report.entries, "signed_size": report.signed_size, "checked_at": time.time()}


def _cost(run_dir: Path) -> dict | None:
    """Per-node shares from coordinator.cost_share (attested compute, FLOPs, bytes, peak memory)."""
    if not (run_dir / "metrics.jsonl").exists():
        return None
    from coordinator.cost_share import cost_share

    try:
        share = cost_share(run_dir)
    except Exception as error:  # noqa: BLE001 -- a half-written run must not take the page down; say why
        return {"error": f"{type(error).__name__}: {error}", "nodes": []}
    nodes = []
    for node in share.nodes:
        nodes.append({
            "node_id": node.node_id, "blocks": [list(b) for b in node.blocks], "steps": node.steps,
            "tokens": node.tokens, "compute_seconds": node.compute_seconds, "compute_share": node.compute_share,
            "flops": node.flops, "flops_share": node.flops_share, "bytes_sent": node.bytes_sent,
            "bytes_received": node.bytes_received, "peak_rss_bytes": node.peak_rss_bytes,
            "throughput_tokens_per_s": node.tokens / node.compute_seconds if node.compute_seconds else None,
            "load": node.compute_seconds / share.wall_seconds if share.wall_seconds else None,
        })
    return {"nodes": nodes, "wall_seconds": share.wall_seconds, "trainer_flops": share.trainer_flops,
            "one_machine_seconds": share.one_machine.seconds, "one_machine_how": share.one_machine.how}


def _merge_cost(nodes: list[dict], cost: dict | None) -> None:
    """Throughput and load per node are the attested figures of the cost share."""
    by_node = {row["node_id"]: row for row in (cost or {}).get("nodes", [])}
    for node in nodes:
        row = by_node.get(node["node_id"], {})
        node["throughput_tokens_per_s"] = row.get("throughput_tokens_per_s")
        node["load"] = row.get("load")
        node["compute_share"] = row.get("compute_share")


# --------------------------------------------------------------------------------------------- sources


class LiveStatus:
    """The snapshot of a running coordinator (JSON-clean: no NaN); the session calls `observe_step` and `ended`."""

    def __init__(self, membership, job_status, job: Job, run_dir: Path, address: str = ""):
        self.membership, self.job_status, self.job, self.run_dir = membership, job_status, job, Path(run_dir)
        self.address = address
        self.timeout_s = heartbeat_timeout_s(job.swarm.heartbeat_interval_s)
        self.clock = StepClock()
        self.metrics = MetricsTail(self.run_dir / "metrics.jsonl")
        self.audit = AuditWatch(self.run_dir)
        self.failure: str | None = None
        self._lock = threading.Lock()

    def observe_step(self, step: int) -> None:
        self.clock.observe(step)

    def ended(self, failure: str | None) -> None:
        self.failure = failure
        self.audit.refresh_soon()
        if failure is not None:
            self.job_status.phase = "failed"

    def snapshot(self) -> dict:
        with self._lock:
            self.metrics.refresh()
            now = time.monotonic()
            nodes = []
            for record in self.membership.nodes():
                age = now - record.last_heartbeat
                memory = record.memory
                nodes.append({
                    "node_id": record.node_id, "device": record.hello.device, "hostname": record.hello.hostname,
                    "memory_offered_bytes": record.hello.memory_bytes,
                    "blocks": [record.blocks.start, record.blocks.end] if record.blocks else None,
                    "state": display_state(record.state, age, self.timeout_s), "raw_state": record.state,
                    "last_heartbeat_age_s": age, "failure": record.failure or None,
                    "rss_bytes": memory.rss_bytes if memory else None,
                    "peak_rss_bytes": memory.peak_rss_bytes if memory else None,
                    "peer_id": record.ready.peer_id if record.ready else None,
                })
            audit, cost = self.audit.read()
            _merge_cost(nodes, cost)
            step = self.job_status.step
            return nan_to_null({
                "schema": SCHEMA_VERSION, "source": "live", "generated_at": time.time(),
                "job": {"id": self.job_status.job_id, "name": self.job.name, "model": _model_name(self.job),
                        "run_dir": str(self.run_dir), "address": self.address},
                "heartbeat": {"interval_s": self.job.swarm.heartbeat_interval_s, "timeout_s": self.timeout_s},
                "progress": progress_section(self.job, self.job_status.phase, step, self.clock.steps_per_s(),
                                             self.failure),
                "nodes": nodes,
                "blocks": coverage_section(self.job_status.num_blocks, nodes),
                **self.metrics.section(),
                "cost": cost,
                "audit": audit,
            })


def run_dir_snapshot(run_dir: Path) -> dict:
    """The snapshot of a run from its directory alone (the coordinator may be long gone); JSON-clean."""
    run_dir = Path(run_dir)
    job = load_job(run_dir / "job.yaml")
    metrics = MetricsTail(run_dir / "metrics.jsonl")
    metrics.refresh()
    watch = AuditWatch(run_dir, refresh_s=0.0, background=False)
    audit, cost = watch.read()
    job_id, nodes = _nodes_from_audit(run_dir)
    reported = {}
    if (run_dir / "nodes.json").exists():
        reported = {node["node_id"]: node for node in json.loads((run_dir / "nodes.json").read_text())}
    for node in nodes:
        extra = reported.get(node["node_id"], {})
        node["peak_rss_bytes"] = extra.get("peak_rss_bytes")
    _merge_cost(nodes, cost)
    step = (metrics.train[-1]["step"] + 1) if metrics.train else 0
    state = "done" if step >= job.total_steps and reported else "stopped"
    num_blocks = max((node["blocks"][1] for node in nodes if node["blocks"]), default=0)
    return nan_to_null({
        "schema": SCHEMA_VERSION, "source": "run_dir", "generated_at": time.time(),
        "job": {"id": job_id, "name": job.name, "model": _model_name(job), "run_dir": str(run_dir), "address": ""},
        "heartbeat": {"interval_s": job.swarm.heartbeat_interval_s,
                      "timeout_s": heartbeat_timeout_s(job.swarm.heartbeat_interval_s)},
        "progress": progress_section(job, state, step, None, None),
        "nodes": nodes,
        "blocks": coverage_section(num_blocks, nodes),
        **metrics.section(),
        "cost": cost,
        "audit": audit,
    })


def _nodes_from_audit(run_dir: Path) -> tuple[str, list[dict]]:
    """Nodes as the signed coordinator events recorded them: join (host, device), assignment, leave."""
    path = run_dir / audit_db.DB_NAME
    if not path.exists():
        return "", []
    connection = audit_db.connect_readonly(path)
    try:
        rows = connection.execute("SELECT kind, payload FROM entries WHERE kind IN "
                                  "('job_start', 'join', 'assignment', 'leave') ORDER BY idx").fetchall()
    finally:
        connection.close()
    job_id, nodes = "", {}
    for kind, payload in rows:
        event = json.loads(payload)
        if kind == "job_start":
            job_id = event.get("job_id", "")
            continue
        node = nodes.setdefault(event["node_id"], {
            "node_id": event["node_id"], "device": "", "hostname": "", "memory_offered_bytes": None,
            "blocks": None, "state": "finished", "raw_state": "finished", "last_heartbeat_age_s": None,
            "failure": None, "rss_bytes": None, "peak_rss_bytes": None, "peer_id": None})
        if kind == "join":
            node["device"], node["hostname"] = event.get("device", ""), event.get("hostname", "")
        elif kind == "assignment":
            node["blocks"] = [event["block_start"], event["block_end"]]
        elif kind == "leave":
            node["state"] = node["raw_state"] = event.get("state", "left")
            node["failure"] = event.get("reason") or None
    return job_id, list(nodes.values())


def _model_name(job: Job) -> str:
    return job.model.preset or str(job.model.path)
