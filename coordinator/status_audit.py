"""audit.db as the status snapshot shows it: cheap counts on every request, verification and cost shares
(swarm.audit.verify, coordinator.cost_share) in the background, since they read the whole log."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from swarm.audit import db as audit_db
from swarm.audit.entry import ATTESTATION

AUDIT_REFRESH_S = 10.0  # least time between two verifications of a growing log
AUDIT_BUSY_FRACTION = 0.2  # and at most this fraction of the time spent verifying (a big log takes seconds)


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


def merge_cost(nodes: list[dict], cost: dict | None) -> None:
    """Throughput and load per node are the attested figures of the cost share."""
    by_node = {row["node_id"]: row for row in (cost or {}).get("nodes", [])}
    for node in nodes:
        row = by_node.get(node["node_id"], {})
        node["throughput_tokens_per_s"] = row.get("throughput_tokens_per_s")
        node["load"] = row.get("load")
        node["compute_share"] = row.get("compute_share")
