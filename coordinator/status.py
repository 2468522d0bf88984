"""One JSON-able picture of a run, shared by the status page, its JSON endpoint, `status` and `report`.

Two sources build the same schema (`SCHEMA_VERSION`): `LiveStatus` reads a running coordinator's membership
and job status; `run_dir_snapshot` reads a run directory alone (job.yaml, metrics.jsonl, audit.db,
nodes.json), so a finished or crashed run can be shown later. Measurements come from metrics.jsonl only
(nothing computes the same figure twice, so the page, the CLI and the report cannot disagree); audit state
and cost shares come from audit.db through `swarm.audit.verify` and `coordinator.cost_share`, which are too
slow to run on every request and are refreshed in the background (coordinator.status_audit). This module
puts the sections together; coordinator.status_metrics reads metrics.jsonl.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path

from coordinator.membership import heartbeat_timeout_s
from coordinator.run_dir import nan_to_null
from coordinator.status_audit import AuditWatch, merge_cost
from coordinator.status_metrics import MetricsTail
from swarm.audit import db as audit_db
from swarm.config import Job, load_job
from swarm.node_state import NodeState

SCHEMA_VERSION = 1
SERVING = ("up", "finished")  # displayed states whose blocks count as covered
DISPLAYED = {NodeState.READY: "up", NodeState.JOINED: "joining", NodeState.ASSIGNED: "loading"}  # others as named


def display_state(state: NodeState | str, heartbeat_age_s: float | None, timeout_s: float) -> str:
    """What the page shows: a node that should be heartbeating but has been silent too long is down."""
    state = NodeState(state)
    if state.heartbeats and heartbeat_age_s is not None and heartbeat_age_s > timeout_s:
        return "down"
    return DISPLAYED.get(state, state.value)


def to_json(snapshot: dict) -> str:
    return json.dumps(nan_to_null(snapshot), allow_nan=False, separators=(",", ":"))


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
                    "state": display_state(record.state, age, self.timeout_s), "raw_state": record.state.value,
                    "last_heartbeat_age_s": age, "failure": record.failure or None,
                    "rss_bytes": memory.rss_bytes if memory else None,
                    "peak_rss_bytes": memory.peak_rss_bytes if memory else None,
                    "peer_id": record.ready.peer_id if record.ready else None,
                })
            audit, cost = self.audit.read()
            merge_cost(nodes, cost)
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
    merge_cost(nodes, cost)
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
            "blocks": None, "state": NodeState.FINISHED.value, "raw_state": NodeState.FINISHED.value, "last_heartbeat_age_s": None,
            "failure": None, "rss_bytes": None, "peak_rss_bytes": None, "peer_id": None})
        if kind == "join":
            node["device"], node["hostname"] = event.get("device", ""), event.get("hostname", "")
        elif kind == "assignment":
            node["blocks"] = [event["block_start"], event["block_end"]]
        elif kind == "leave":
            node["state"] = node["raw_state"] = event.get("state", NodeState.LEFT.value)
            node["failure"] = event.get("reason") or None
    return job_id, list(nodes.values())


def _model_name(job: Job) -> str:
    return job.model.preset or str(job.model.path)
