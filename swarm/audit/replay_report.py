"""What `swarm-audit replay` found: per-step, per-node checks and the findings that name a node, as replay.json."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swarm.audit.errors import AuditError
from swarm.audit.query import REPLAY_FILE

COORDINATOR = "coordinator"  # the node_id of a finding against the trainer's own work (its batch)


class ReplayError(AuditError):
    """The run directory cannot be replayed at all (no verified log, no snapshots, unusable files)."""


@dataclass
class Finding:
    """One thing that does not hold: which node (or the coordinator), which step, which check, by how much."""

    node_id: str
    phase: str
    step: int
    check: str
    detail: str

    def __str__(self) -> str:
        return f"node {self.node_id} step {self.step} ({self.phase}): {self.check}: {self.detail}"


@dataclass
class NodeCheck:
    node_id: str
    block_start: int
    block_end: int
    sketch_error: float
    weights_error: float
    optimizer_error: float
    local_sketch_error: float | None = None  # replicas: the node's own gradient against its local sketch


@dataclass
class StepCheck:
    step: int
    phase: str
    nodes: list[NodeCheck] = field(default_factory=list)


@dataclass
class ReplayReport:
    snapshots: int  # snapshotted steps in the run
    replayed: list[StepCheck]
    attested_steps: int  # attestations whose state chain was checked
    findings: list[Finding]
    sketch_tolerance: float
    state_tolerance: float

    @property
    def ok(self) -> bool:
        return not self.findings

    def failed_nodes(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for finding in self.findings:
            counts[finding.node_id] += 1
        return dict(counts)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "snapshots": self.snapshots, "attested_steps": self.attested_steps,
                "sketch_tolerance": self.sketch_tolerance, "state_tolerance": self.state_tolerance,
                "replayed": [asdict(step) for step in self.replayed],
                "findings": [asdict(finding) for finding in self.findings],
                "failed_nodes": self.failed_nodes()}


def write_report(run_dir: Path, report: ReplayReport) -> Path:
    path = Path(run_dir) / REPLAY_FILE
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path
