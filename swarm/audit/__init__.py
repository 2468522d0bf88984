"""The audit log: signed attestations and coordinator events in an append-only, hash-chained SQLite file,
with RFC 6962 Merkle tree heads, verification from the file alone, and the `swarm-audit` CLI.

Modules: `merkle` (tree hashing and proofs), `canonical` (the signed byte encoding), `attestation` (what a
node signs per step), `sketch` (the gradient projection; imports torch, so it is not imported here),
`entry` (record formats and hashes), `db` (the SQLite file), `log` (the writer), `verify`, `query`,
`proof` (standalone inclusion proofs), `data_manifest` (what a phase commits to train on, before it starts),
`data_audit` and `data_regenerate` (`swarm-audit data`; the latter imports torch), `cli`.
"""

from swarm.audit.attestation import (
    Attestation, MicroBatch, SignedAttestation, check_attestation, sign_attestation, verify_attestation,
)  # fmt: skip
from swarm.audit.entry import Entry, TreeHead
from swarm.audit.log import AuditLog
from swarm.audit.verify import Problem, VerifyReport, verify_log

__all__ = [
    "Attestation",
    "AuditLog",
    "Entry",
    "MicroBatch",
    "Problem",
    "SignedAttestation",
    "TreeHead",
    "VerifyReport",
    "check_attestation",
    "sign_attestation",
    "verify_attestation",
    "verify_log",
]
