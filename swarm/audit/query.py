"""Answers from a run's audit log: who trained what (`who`), proofs of single entries, a JSONL export.

These read the log as stored and do not verify it; run `verify_log` (swarm-audit verify) first to know
the answers rest on an untampered log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from swarm.audit.attestation import Attestation
from swarm.audit.canonical import parse_json_object
from swarm.audit.entry import ATTESTATION
from swarm.audit.errors import AttestationError, AuditError, EntryNotFoundError
from swarm.audit.log import AuditLog
from swarm.audit.proof import build_proof

logger = logging.getLogger(__name__)

REPLAY_FILE = "replay.json"  # what the last `swarm-audit replay` of a run found, in its run directory


@dataclass
class NodeWork:
    """One node's attested work: block ranges are half-open [start, end), like BlockRange."""

    node_id: str
    blocks: list[tuple[int, int]] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)  # in the order first attested
    steps: int = 0
    first_step: int = 0
    last_step: int = 0
    tokens: int = 0
    compute_seconds: float = 0.0
    bytes_sent: int = 0  # by the node, in its attested steps' training calls
    bytes_received: int = 0
    compute_share: float = 0.0  # of the compute seconds in the answer; of the steps when no time was reported


def who(path: str | Path, phase: str | None = None, block: int | None = None) -> list[NodeWork]:
    """Per node: blocks, phases, steps, tokens and compute share of the attestations matching the filters."""
    work: dict[str, NodeWork] = {}
    with AuditLog.open(path) as log:
        for entry in log.entries():
            if entry.kind != ATTESTATION:
                continue
            try:
                attestation = Attestation.from_bytes(entry.payload)
            except AttestationError as error:
                logger.warning("entry %d skipped: %s", entry.index, error)
                continue
            if phase is not None and attestation.phase != phase:
                continue
            if block is not None and not attestation.block_start <= block < attestation.block_end:
                continue
            _add(work.setdefault(attestation.node_id, NodeWork(attestation.node_id)), attestation)
    rows = sorted(work.values(), key=lambda row: (min(row.blocks), row.node_id))
    total_seconds = sum(row.compute_seconds for row in rows)
    total_steps = sum(row.steps for row in rows)
    for row in rows:
        row.compute_share = row.compute_seconds / total_seconds if total_seconds > 0 else row.steps / total_steps
    return rows


def _add(row: NodeWork, attestation: Attestation) -> None:
    blocks = (attestation.block_start, attestation.block_end)
    if blocks not in row.blocks:
        row.blocks = sorted([*row.blocks, blocks])
    if attestation.phase not in row.phases:
        row.phases.append(attestation.phase)
    row.first_step = attestation.step if row.steps == 0 else min(row.first_step, attestation.step)
    row.last_step = attestation.step if row.steps == 0 else max(row.last_step, attestation.step)
    row.steps += 1
    row.tokens += attestation.tokens
    row.compute_seconds += attestation.compute_seconds
    row.bytes_sent += attestation.bytes_sent
    row.bytes_received += attestation.bytes_received


def replay_findings(run_dir: str | Path) -> dict[str, int] | None:
    """Findings per node from the last `swarm-audit replay` of this run; None if it was never replayed."""
    path = Path(run_dir) / REPLAY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("failed_nodes", {})


def inclusion_proof(path: str | Path, entry_index: int) -> dict[str, Any]:
    """A proof (see `swarm.audit.proof`) that entry `entry_index` is in the latest signed tree head."""
    with AuditLog.open(path) as log:
        entry = log.entry(entry_index)
        heads = log.tree_heads()
        if not heads or heads[-1].tree_size <= entry_index:
            covered = heads[-1].tree_size if heads else 0
            raise EntryNotFoundError(
                f"entry {entry_index} is newer than the latest signed tree head (it covers {covered} entries); "
                "the coordinator signs one at every phase end"
            )
        head = heads[-1]
        if head.tree_size > len(log):
            raise AuditError(f"the latest tree head signs {head.tree_size} entries but the log has {len(log)}; "
                             "run swarm-audit verify")  # fmt: skip
        author_key = log.node_keys().get(entry.author, b"") if entry.kind == ATTESTATION else log.coordinator_key
        path_nodes = log.tree.inclusion_proof(entry_index, head.tree_size)
        return build_proof(log.job_id, entry, author_key, path_nodes, head, log.coordinator_key)


def export_jsonl(path: str | Path, out: IO[str]) -> int:
    """Write every entry, then every tree head, one JSON object a line; returns the number of lines.

    For analysis: payloads are parsed into objects (their exact signed bytes stay in the audit.db, which
    remains the evidence). Binary fields are hex.
    """
    lines = 0
    with AuditLog.open(path) as log:
        for entry in log.entries():
            try:
                payload: Any = parse_json_object(entry.payload)
            except ValueError:
                payload = entry.payload.decode("ascii", errors="backslashreplace")
            record = {"record": "entry", **entry.to_json(), "payload": payload}
            out.write(json.dumps(record, sort_keys=True) + "\n")
            lines += 1
        for head in log.tree_heads():
            out.write(json.dumps({"record": "tree_head", **head.to_json()}, sort_keys=True) + "\n")
            lines += 1
    return lines
