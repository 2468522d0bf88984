"""Each phase's data manifest, signed before its first step, and every batch checked against it as it is built.

What a manifest commits and why: swarm.audit.data_manifest. Building it means building every batch of the phase
once up front (batches are a pure function of the job), which the log line reports the cost of; during training
the trainer hashes each batch it builds (well under a millisecond) and stops the run if it is not the one
committed, since the manifest would then be false.

Resume: an interrupted phase's manifest is already in the log. It is not signed again; the manifest rebuilt now
must equal it field for field (same job, same data files, same batches), else the run stops naming the fields
that differ, because the steps attested before the crash were committed to the signed one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from swarm.audit.data_manifest import (
    MANIFEST_EVENT, batch_sha256, build_manifest, data_files, differences, signed_manifests, write_step_hashes,
)  # fmt: skip
from swarm.audit.log import AuditLog
from swarm.config import Job
from swarm.data.batches import Batch, TrainingData
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.coordinator")


class DataCommitmentError(SwarmError):
    """A phase's data is not what its signed manifest committed (resumed with other data, or a batch differs)."""


@dataclass(frozen=True)
class PhaseCommitment:
    phase: str
    step_hashes: tuple[bytes, ...]

    def check(self, phase_step: int, batch: Batch) -> None:
        """Raise unless `batch` is the one committed for `phase_step`."""
        if batch_sha256(batch) != self.step_hashes[phase_step]:
            raise DataCommitmentError(
                f"phase {self.phase} step {phase_step}: the batch built now is not the one its signed data manifest "
                "committed (the data generator is not deterministic?); the run stops rather than train on it")


def commit_phase_data(audit: AuditLog | None, run_dir: Path, job: Job, phase_index: int, data: TrainingData,
                      first_step: int) -> PhaseCommitment | None:
    """Sign phase `phase_index`'s data manifest (or find it signed already); None without an audit log."""
    if audit is None:
        return None
    phase = job.phase_list[phase_index]
    started = time.perf_counter()
    manifest = build_manifest(job, phase_index, data, first_step, data_files(job, phase, run_dir))
    seconds = time.perf_counter() - started
    fields = manifest.event_fields()
    write_step_hashes(run_dir, manifest)
    signed = signed_manifests(audit.entries()).get(phase.name)
    if signed is None:
        entry = audit.append_event(MANIFEST_EVENT, **fields)
        logger.info("data manifest of phase %s: %d step %s built and hashed in %.2f s (%.2f ms a step), root %s "
                    "signed (entry %d)", phase.name, phase.steps, manifest.committed, seconds,
                    1e3 * seconds / phase.steps, fields["batch_root"][:16], entry.index)
    else:
        index, record = signed
        changed = differences(record, fields)
        if changed:
            raise DataCommitmentError(
                f"phase {phase.name}: its data now differ from the manifest the audit log signed at entry {index} "
                f"({', '.join(changed)}); the steps attested so far trained on that data, so the run cannot go on "
                "with other data: restore the job's data files")
        logger.info("data manifest of phase %s: the one signed at entry %d (rebuilt in %.2f s, equal)", phase.name,
                    index, seconds)
    return PhaseCommitment(phase.name, manifest.step_hashes)
