"""Who paid for what each phase did to the backdoor: its triggered rate before and after, beside each node's
share of the phase's compute.

The cost-sharing hazard (Chan et al., hazards paper, §2.2) is many small actors each paying a little of a run that implants, or
fails to remove, a backdoor. This joins the two signed records that answer it, both read from audit.db:

- the effect: the phase's `evaluation` events (the metrics rows, without samples, signed by the coordinator).
  Before a phase is the last evaluation logged before the phase's first `phase` start event (the previous
  phase's end, or the evaluation at the start); after is the phase's last end-of-phase evaluation (after a
  resume, the redone one);
- the payers: the attestations of the phase per node, as `swarm-audit who --phase P` and the report's cost-share
  table (coordinator.cost_share) read them (swarm.audit.query.who): compute seconds and the node's share of all
  nodes' attested compute seconds in that phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swarm.audit.canonical import parse_json_object
from swarm.audit.log import AuditLog
from swarm.audit.query import NodeWork, who
from swarm.config import load_job

TRIGGERED = "backdoor_triggered"


@dataclass
class PhaseEffect:
    phase: str
    kind: str
    before: dict | None = None  # the evaluation event before the phase started (None: there was none)
    after: dict | None = None  # its end-of-phase evaluation
    nodes: list[NodeWork] = field(default_factory=list)

    def rate(self, which: str, key: str = TRIGGERED) -> float | None:
        event = self.before if which == "before" else self.after
        value = (event or {}).get(key)
        return value["rate"] if isinstance(value, dict) and value.get("rate") is not None else None

    @property
    def change(self) -> float | None:
        before, after = self.rate("before"), self.rate("after")
        return None if before is None or after is None else after - before


def phase_effects(run_dir: Path) -> list[PhaseEffect]:
    """Per phase of the job, in order: its evaluations before and after, and who trained it."""
    run_dir = Path(run_dir)
    job = load_job(run_dir / "job.yaml")
    evaluations: list[tuple[int, dict]] = []
    started: dict[str, int] = {}
    with AuditLog.open(run_dir / "audit.db") as log:
        for entry in log.entries():
            if entry.kind == "evaluation":
                evaluations.append((entry.index, parse_json_object(entry.payload)))
            elif entry.kind == "phase":
                event = parse_json_object(entry.payload)
                if event.get("event") == "start":
                    started.setdefault(event["phase"], entry.index)
    effects = []
    for phase in job.phase_list:
        effect = PhaseEffect(phase.name, phase.kind, nodes=who(run_dir / "audit.db", phase=phase.name))
        if phase.name in started:
            earlier = [event for index, event in evaluations if index < started[phase.name]]
            effect.before = earlier[-1] if earlier else None
        ends = [event for _, event in evaluations if event.get("phase") == phase.name and event.get("phase_end")]
        effect.after = ends[-1] if ends else None
        effects.append(effect)
    return effects


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def who_paid_lines(run_dir: Path) -> list[str]:
    """The report's "who paid for it" section (markdown)."""
    effects = [effect for effect in phase_effects(run_dir) if effect.nodes or effect.after]
    lines = ["## Who paid for each phase's effect on the backdoor", ""]
    if not any(effect.after for effect in effects):
        return lines + ["No end-of-phase evaluations in audit.db: no effect to join with the nodes' shares.", ""]
    lines += [
        "The backdoor rate with the trigger before and after each phase, from the signed `evaluation` events in "
        "`audit.db` (before: the last evaluation before the phase started; after: its end-of-phase evaluation), beside "
        "each node's compute seconds in that phase and its share of all nodes' attested compute seconds there (the "
        "share `swarm-audit who --phase P` prints).", "",
        "| phase | kind | triggered before | triggered after | change | node | blocks | compute s | share of the phase |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for effect in effects:
        change = "—" if effect.change is None else f"{effect.change:+.3f}"
        phase_cells = [effect.phase, effect.kind, _rate(effect.rate("before")), _rate(effect.rate("after")), change]
        for number, node in enumerate(effect.nodes or [None]):
            cells = list(phase_cells) if number == 0 else [""] * len(phase_cells)
            if node is None:
                cells += ["—", "", "", ""]
            else:
                blocks = ", ".join(f"[{start},{end})" for start, end in node.blocks)
                cells += [f"`{node.node_id}`", blocks, f"{node.compute_seconds:.2f}", f"{100 * node.compute_share:.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
