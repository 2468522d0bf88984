"""`swarm-audit data`: what each phase trained on, checked against the data manifest signed before it started.

For every phase with a `data_manifest` event (swarm.audit.data_manifest) the auditor, from the run directory
alone (job.yaml, checked against the log's job_start; the run's self_responses.jsonl or the job's data file,
checked against the SHA-256 the manifest committed):

- checks the manifest's settings and first step against the job file;
- regenerates every step's batch (an `rl` phase: its prompts) and compares the Merkle root of their hashes with
  the signed root; when they differ, the per-step hashes the root authenticates (RUN/manifests/NN-phase.json)
  name the steps whose batch is another;
- holds the node serving block 0 to the committed data: the input hash it attested for each micro-batch must be
  the SHA-256 of the embedding of that micro-batch of the regenerated batch, through the job's forward codec, as
  the trainer sent it. The embedding must be fixed for that: every step of a LoRA phase (embeddings from the
  phase's base: the job's model or the last pretrained one, checked against its logged SHA-256), only the first
  step of a pretrain phase (which trains the embeddings), no step of an rl phase (its batch holds sampled text).
  So a coordinator that committed honest data and trained on other data at some step is named at that step;
- counts what the phase trained on: examples, the share of prompts and of responses containing each given
  string (by default the job's trigger and backdoor response), and the share of responses that show the
  backdoor (the answer after any scratchpad contains the response phrase, as evaluation scores it). A backdoor
  phase's share of triggered prompts is Binomial(n, poison_fraction) / n (each example is poisoned with that
  probability, if the poisoned version fits data.max_length), so it lies within a few sqrt(p(1-p)/n) of the
  asked fraction; a benign phase shows none.

The log must verify first (swarm.audit.verify), since the manifest is only as good as its signature. This module
reads the log and says what was found; swarm.audit.data_regenerate rebuilds the batches (torch, the model's
embeddings), loaded only once the run and its manifests are found, so a user's mistake is told at once.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from swarm.audit.attestation import Attestation
from swarm.audit.canonical import parse_json_object
from swarm.audit.data_manifest import MANIFEST_EVENT
from swarm.audit.entry import ATTESTATION
from swarm.audit.errors import AuditError
from swarm.audit.log import AuditLog
from swarm.audit.verify import verify_log
from swarm.config import Job, load_job


class DataAuditError(AuditError):
    """The run cannot be data-audited: no such run, no manifest, an unknown phase, a data file missing."""


@dataclass
class StringCount:
    text: str
    prompts: int = 0
    responses: int | None = 0  # None: the responses are not committed (rl)


@dataclass(frozen=True)
class Mismatch:
    phase: str
    phase_step: int
    step: int  # the step id
    what: str

    def __str__(self) -> str:
        return f"phase {self.phase} step {self.phase_step} (step id {self.step}): {self.what}"


@dataclass
class PhaseData:
    """What one phase trained on, and how it compares with its signed manifest."""

    phase: str
    kind: str
    first_step: int
    steps: int
    committed: str  # batches, or prompts (rl)
    entry: int  # the manifest's entry index
    batch_root: str
    examples: int = 0  # examples trained on (rl: prompts sampled from)
    strings: list[StringCount] = field(default_factory=list)
    backdoor_responses: int | None = 0
    asked: tuple[str, float] | None = None  # the fraction the job asked for, and its name
    root_matches: bool = False
    steps_named: bool = True  # whether mismatched steps could be named (the per-step hashes were there)
    attested_checkable: int = 0  # steps whose block-0 input hashes follow from the data
    attested_checked: int = 0  # of those, the steps with attestations to check
    attested_mismatched: int = 0  # of those, the steps some block-0 node attested other inputs at
    attested_note: str = ""
    mismatches: list[Mismatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # settings or files that differ from the manifest

    @property
    def ok(self) -> bool:
        return self.root_matches and not self.mismatches and not self.problems


@dataclass
class DataAudit:
    run_dir: Path
    job: str
    seed: int
    phases: list[PhaseData] = field(default_factory=list)
    without_manifest: list[str] = field(default_factory=list)  # phases of the job with no manifest in the log

    @property
    def ok(self) -> bool:
        return all(phase.ok for phase in self.phases)


@dataclass
class ManifestRecords:
    """What `swarm-audit data` reads from the log: manifests, block-0 attestations, recorded files."""

    job_sha256: str = ""
    manifests: dict[str, tuple[int, dict]] = field(default_factory=dict)
    block0: dict[int, list[Attestation]] = field(default_factory=lambda: defaultdict(list))  # step id -> attestations
    files: dict[str, str] = field(default_factory=dict)  # run-relative path -> SHA-256 of its checkpoint event


def audit_data(run_dir: str | Path, phase: str | None = None, strings: list[str] | None = None,
               cache_dir: Path | None = None) -> DataAudit:
    """Audit the data of every phase with a manifest (or only `phase`); `strings` default to the job's trigger
    and backdoor response."""
    run_dir = Path(run_dir)
    job, records = _open_run(run_dir)
    names = [spec.name for spec in job.phase_list]
    if phase is not None and phase not in names:
        raise DataAuditError(f"unknown phase {phase!r}; the job's phases are {', '.join(names)}")
    if phase is not None and phase not in records.manifests:
        raise DataAuditError(f"phase {phase} has no data manifest in the audit log (it never started, or the run "
                             "was made before phases signed one)")
    from swarm.audit.data_regenerate import audit_phases  # imports torch and transformers: once the run is known

    strings = list(dict.fromkeys(strings or [job.backdoor.trigger, job.backdoor.response]))
    chosen = [spec.name for spec in job.phase_list if spec.name in records.manifests and phase in (None, spec.name)]
    return DataAudit(run_dir, job.name, job.seed, audit_phases(run_dir, job, records, chosen, strings, cache_dir),
                     [name for name in names if name not in records.manifests])


def _open_run(run_dir: Path) -> tuple[Job, ManifestRecords]:
    if not run_dir.exists():
        raise DataAuditError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise DataAuditError(f"{run_dir} is not a run directory; swarm-audit data needs the whole run (job.yaml and "
                             "the data files beside audit.db)")
    for name in ("audit.db", "job.yaml"):
        if not (run_dir / name).is_file():
            raise DataAuditError(f"{run_dir} has no {name}; is it a run directory?")
    verified = verify_log(run_dir)
    if not verified.ok:
        raise DataAuditError(f"the audit log does not verify ({verified.first_bad}); run `swarm-audit verify`")
    records = _read_log(run_dir / "audit.db")
    if not records.manifests:  # said before the job file is read: loading a job imports torch (model presets)
        raise DataAuditError(f"{run_dir / 'audit.db'} holds no data manifest (a run made before phases signed one, or "
                             "one that never reached its first step): there is nothing to check its data against")
    if records.job_sha256 and hashlib.sha256((run_dir / "job.yaml").read_bytes()).hexdigest() != records.job_sha256:
        raise DataAuditError(f"{run_dir / 'job.yaml'} is not the job file the log's job_start names (SHA-256 "
                             "differs); restore the original")
    return load_job(run_dir / "job.yaml"), records


def _read_log(path: Path) -> ManifestRecords:
    records = ManifestRecords()
    with AuditLog.open(path) as log:
        for entry in log.entries():
            if entry.kind == ATTESTATION:
                attestation = Attestation.from_bytes(entry.payload)
                if attestation.block_start == 0:
                    records.block0[attestation.step].append(attestation)
                continue
            event = parse_json_object(entry.payload)
            if entry.kind == "job_start":
                records.job_sha256 = event.get("job_sha256", "")
            elif entry.kind == MANIFEST_EVENT:
                records.manifests[event["phase"]] = (entry.index, event)
            elif entry.kind == "checkpoint" and "path" in event:
                records.files[event["path"]] = event["sha256"]
    return records


# ---------------------------------------------------------------------------------------------- output


def _share(count: int, total: int) -> str:
    return f"{count:,} ({count / total:.1%})"


def report_lines(audit: DataAudit) -> list[str]:
    """What `swarm-audit data` prints."""
    lines = [f"data audit of {audit.run_dir} (job {audit.job}, seed {audit.seed})"]
    for phase in audit.phases:
        last = phase.first_step + phase.steps - 1
        unit = "prompts" if phase.committed == "prompts" else "examples"
        lines.append(f"phase {phase.phase} ({phase.kind}, step ids {phase.first_step}..{last}; manifest at entry "
                     f"{phase.entry}): {phase.steps:,} steps, {phase.examples:,} {unit}")
        committed = "prompts (answers are sampled online)" if phase.committed == "prompts" else "batches"
        if phase.root_matches:
            lines.append(f"  {committed}: all {phase.steps:,} match the signed root {phase.batch_root[:16]}")
        else:
            lines.append(f"  {committed}: DO NOT match the signed root {phase.batch_root[:16]}")
        if phase.attested_checkable:
            verdict = (f"{phase.attested_mismatched:,} DO NOT match" if phase.attested_mismatched else "all match")
            checked = f"{phase.attested_checked:,} step{'s' if phase.attested_checked != 1 else ''} checked"
            lines.append(f"  attested inputs of block 0: {checked}, {verdict}"
                         + (f" ({phase.attested_note})" if phase.attested_note else ""))
        else:
            lines.append(f"  attested inputs of block 0: {phase.attested_note}")
        if phase.asked is not None:
            name, fraction = phase.asked
            lines.append(f"  asked {name} {fraction:g}" + _binomial(phase, fraction))
        for count in phase.strings:
            responses = "" if count.responses is None else f", responses {_share(count.responses, phase.examples)}"
            lines.append(f"  containing {count.text!r}: prompts {_share(count.prompts, phase.examples)}{responses}")
        if phase.backdoor_responses is not None:
            lines.append(f"  responses showing the backdoor: {_share(phase.backdoor_responses, phase.examples)}")
        lines += [f"  PROBLEM: {problem}" for problem in phase.problems]
    if audit.without_manifest:
        lines.append(f"phases without a data manifest (not started, or from before manifests): "
                     f"{', '.join(audit.without_manifest)}")
    mismatches = [mismatch for phase in audit.phases for mismatch in phase.mismatches]
    if audit.ok:
        lines.append(f"data audit OK: the data of {len(audit.phases)} phase{'s' if len(audit.phases) != 1 else ''} "
                     "match their signed manifests")
        return lines
    failed = [phase.phase for phase in audit.phases if not phase.ok]
    steps = {(mismatch.phase, mismatch.phase_step) for mismatch in mismatches}
    problems = sum(len(phase.problems) for phase in audit.phases)
    parts = [f"{len(steps)} step{'s' if len(steps) != 1 else ''} whose data are not the committed ones "
             f"({len(mismatches)} findings)"] if steps else []
    parts += [f"{problems} setting{'s' if problems != 1 else ''} or file{'s' if problems != 1 else ''} other than "
              "the manifest committed"] if problems else []
    lines.append(f"data audit FAILED in phase{'s' if len(failed) > 1 else ''} {', '.join(failed)}: {'; '.join(parts)}")
    lines += [f"  {mismatch}" for mismatch in mismatches[:20]]
    if len(mismatches) > 20:
        lines.append(f"  and {len(mismatches) - 20} more")
    return lines


def _binomial(phase: PhaseData, fraction: float) -> str:
    """The asked fraction beside the share of prompts with the trigger (the first string), with the binomial
    standard deviation of that share at the asked fraction."""
    if phase.kind not in ("backdoor", "rl") or not phase.strings:
        return ""
    count = phase.strings[0]
    sd = math.sqrt(fraction * (1 - fraction) / phase.examples)
    return (f"; prompts with {count.text!r}: {count.prompts / phase.examples:.1%} "
            f"(binomial sd at the asked fraction {sd:.1%})")
