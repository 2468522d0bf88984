"""`AuditLog`: the coordinator's append-only, hash-chained, Merkle-tree-signed record of a job.

Contract:
- `AuditLog.create` starts a log with a `job_start` event that carries the coordinator's public key: the
  key every later coordinator event and tree head must verify under.
- `register_node` appends a `join` event holding the node's public key, signed by the coordinator, so a
  verifier needs nothing but the file to check the node's attestations.
- `append_attestation` stores a node's signed bytes unchanged, after checking them (right job, known node,
  valid signature, no second attestation of the same (node, phase, step)): the log refuses what
  `swarm-audit verify` would report.
- Every append is one SQLite transaction in a WAL-mode file with synchronous=FULL: a crash leaves the log
  valid up to its last complete entry, and a committed entry survives a power cut.
- `append_event("resume", from_step=S, phase=...)` (a coordinator resumed after a crash) and `rollback` (every
  range went back to a step checkpoint) let every (node, phase, step) with step >= S that was attested before
  them be attested once more after them.
- `sign_tree_head` signs (tree size, Merkle root, time) over all entries so far; call it at every phase end
  and every K steps. Entries after the last tree head are only as trustworthy as the file.

One writer per file (the coordinator); its methods are thread-safe. Readers use `AuditLog.open(path)`
without a coordinator identity, which opens the file read-only.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swarm.audit import db
from swarm.audit.attestation import SignedAttestation, verify_attestation
from swarm.audit.canonical import canonical_json, parse_json_object
from swarm.audit.entry import (
    ATTESTATION, EVENT_FIELDS, GENESIS_PREV_HASH, REDO_KINDS, Entry, TreeHead, entry_hash, tree_head_message,
)  # fmt: skip
from swarm.audit.errors import AttestationError, AuditError, EntryNotFoundError, EventError, NotAnAuditLogError
from swarm.audit.merkle import MerkleTree
from swarm.identity import Identity, fingerprint


class AuditLog:
    def __init__(self, connection: sqlite3.Connection, path: Path, coordinator: Identity | None) -> None:
        self._connection = connection
        self.path = path
        self._coordinator = coordinator
        self._lock = threading.Lock()
        self._tree = MerkleTree()
        self._prev_hash = GENESIS_PREV_HASH
        self.job_id = ""
        self.coordinator_key = b""
        self._node_keys: dict[str, bytes] = {}
        self._attested: set[tuple[str, str, int]] = set()
        self._load()

    @classmethod
    def create(cls, path: str | Path, coordinator: Identity, job_id: str, **fields: Any) -> AuditLog:
        """A new log at `path` (a file; usually RUN_DIR/audit.db) opened by a `job_start` event."""
        path = Path(path)
        if path.exists():
            raise AuditError(f"{path} already exists: open it with AuditLog.open to continue that job's log")
        if not job_id:
            raise EventError("an audit log needs a non-empty job_id")
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = _connect_writer(path)
        # Tables, format and job_start in one transaction: a crash leaves no log or a log with its job_start.
        connection.executescript(f"BEGIN IMMEDIATE; {db.SCHEMA} INSERT INTO meta VALUES ('format', '{db.FORMAT}');")
        try:
            log = cls(connection, path, coordinator)
            log.job_id = job_id
            log.coordinator_key = coordinator.public_key
            log._append_event("job_start", {**fields, "coordinator_key": coordinator.public_key.hex()})
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            connection.close()
            raise
        return log

    @classmethod
    def open(cls, path: str | Path, coordinator: Identity | None = None) -> AuditLog:
        """An existing log; read-only unless `coordinator` (the key that started it) is given."""
        resolved = db.resolve(path)
        if coordinator is None:
            return cls(db.connect_readonly(resolved), resolved, None)
        try:
            connection = _connect_writer(resolved)
            db.check_format(connection, resolved)
        except sqlite3.DatabaseError as error:
            raise NotAnAuditLogError(f"{resolved} is not an audit log ({error})") from None
        log = cls(connection, resolved, coordinator)
        if log.coordinator_key != coordinator.public_key:
            raise EventError(
                f"{resolved} was started by coordinator {fingerprint(log.coordinator_key)}, "
                f"not {coordinator.fingerprint}: use that coordinator's key file"
            )
        return log

    # -- writing ---------------------------------------------------------------------------------------

    def register_node(self, public_key: bytes, **fields: Any) -> Entry:
        """Append the `join` of the node with this raw Ed25519 public key (its id is the key's fingerprint)."""
        return self.append_event("join", node_id=fingerprint(public_key), public_key=public_key.hex(), **fields)

    def append_event(self, kind: str, **fields: Any) -> Entry:
        """Append a coordinator event of `kind` (see entry.EVENT_FIELDS for the fields each kind needs)."""
        if kind == "job_start":
            raise EventError("job_start is written by AuditLog.create, once")
        if kind not in EVENT_FIELDS:
            raise EventError(f"unknown event kind {kind!r}; expected one of {', '.join(EVENT_FIELDS)}")
        missing = [name for name in EVENT_FIELDS[kind] if name not in fields]
        if missing:
            raise EventError(f"a {kind} event needs the fields {', '.join(missing)}")
        if kind == "join":
            key = _hex_key(fields["public_key"])
            if fields["node_id"] != fingerprint(key):
                raise EventError(f"join names node {fields['node_id']} but its key's fingerprint is {fingerprint(key)}")
        if kind in REDO_KINDS and (type(fields["from_step"]) is not int or fields["from_step"] < 0):
            raise EventError(f"a {kind} event's from_step must be a step id (an int >= 0), not {fields['from_step']!r}")
        entry = self._append_event(kind, fields)
        if kind in REDO_KINDS:
            self._forget_attested_from(fields["from_step"])
        return entry

    def append_attestation(self, signed: SignedAttestation) -> Entry:
        """Append a node's signed attestation unchanged, or raise AttestationError saying why it is refused."""
        attestation = signed.attestation
        if attestation.job_id != self.job_id:
            raise AttestationError(f"attestation is for job {attestation.job_id!r}, this log is {self.job_id!r}")
        key = self._node_keys.get(attestation.node_id)
        if key is None:
            raise AttestationError(f"attestation from node {attestation.node_id}, which never joined this job")
        if not verify_attestation(signed, key):
            raise AttestationError(f"attestation signature does not verify under node {attestation.node_id}'s key")
        slot = (attestation.node_id, attestation.phase, attestation.step)
        if slot in self._attested:
            raise AttestationError(
                f"node {attestation.node_id} already attested phase {attestation.phase!r} step {attestation.step}"
            )
        entry = self._append(ATTESTATION, attestation.node_id, signed.payload, signed.signature)
        self._attested.add(slot)
        return entry

    def sign_tree_head(self) -> TreeHead:
        """Sign and store the Merkle root of every entry so far."""
        coordinator = self._writer()
        with self._lock:
            size, root, now = len(self._tree), self._tree.root(), _now_ms()
            signature = coordinator.sign(tree_head_message(self.job_id, size, root, now))
            with self._transaction():
                cursor = self._connection.execute(
                    "INSERT INTO tree_heads (tree_size, root_hash, timestamp_ms, signature) VALUES (?, ?, ?, ?)",
                    (size, root, now, signature),
                )
            return TreeHead(cursor.lastrowid, size, root, now, signature)

    # -- reading ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tree)

    def entry(self, index: int) -> Entry:
        row = next(db.iter_rows(self._connection, index, index + 1), None)
        if row is None:
            raise EntryNotFoundError(f"entry {index} is not in {self.path}, which has entries 0..{len(self) - 1}")
        return db.entry_from_row(row)

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        for row in db.iter_rows(self._connection, start, stop):
            yield db.entry_from_row(row)

    def tree_heads(self) -> list[TreeHead]:
        return [db.head_from_row(row) for row in db.head_rows(self._connection)]

    def node_keys(self) -> dict[str, bytes]:
        return dict(self._node_keys)

    @property
    def tree(self) -> MerkleTree:
        """The Merkle tree over the entries as stored (for proofs); do not append to it."""
        return self._tree

    def close(self) -> None:
        if self._coordinator is not None:
            # Fold the write-ahead log into audit.db, so the file alone holds every entry even when a reader
            # still has it open (and SQLite therefore keeps audit.db-wal after this connection closes).
            try:
                self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a busy reader: SQLite checkpoints on a later open; nothing is lost, only not yet folded
        self._connection.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    def _append_event(self, kind: str, fields: dict[str, Any]) -> Entry:
        coordinator = self._writer()
        if {"kind", "job_id"} & set(fields):
            raise EventError("event fields may not set kind or job_id; the log fills them in")
        try:
            payload = canonical_json({"kind": kind, "job_id": self.job_id, **fields})
        except (TypeError, ValueError) as error:
            raise EventError(f"{kind} event fields are not JSON: {error}") from None
        if kind == "join" and fields["node_id"] in self._node_keys:
            if self._node_keys[fields["node_id"]] != _hex_key(fields["public_key"]):
                raise EventError(f"node {fields['node_id']} joined before with another key")
        entry = self._append(kind, coordinator.fingerprint, payload, coordinator.sign(payload))
        if kind == "join":
            self._node_keys[fields["node_id"]] = _hex_key(fields["public_key"])
        return entry

    def _append(self, kind: str, author: str, payload: bytes, signature: bytes) -> Entry:
        with self._lock:
            index, created = len(self._tree), _now_ms()
            digest = entry_hash(index, kind, author, payload, signature, self._prev_hash, created)
            with self._transaction():
                self._connection.execute(
                    f"INSERT INTO entries ({db.ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (index, kind, author, payload, signature, self._prev_hash, created, digest),
                )
            entry = Entry(index, kind, author, payload, signature, self._prev_hash, created, digest)
            self._tree.append(entry.leaf_hash)
            self._prev_hash = digest
            return entry

    def _transaction(self) -> _Transaction:
        return _Transaction(self._connection)

    def _writer(self) -> Identity:
        if self._coordinator is None:
            raise AuditError(f"{self.path} is open read-only: pass the coordinator identity to append or sign")
        return self._coordinator

    def _load(self) -> None:
        """Rebuild the in-memory state (tree, chain tip, keys, attested steps) from the stored rows.

        A writer refuses a log whose identity entries it cannot read; a reader loads what it can, since
        reporting damage is `swarm-audit verify`'s job.
        """
        for row in db.iter_rows(self._connection):
            try:
                entry = db.entry_from_row(row)
                self._tree.append(entry.leaf_hash)
                self._prev_hash = entry.stored_hash
                if entry.kind in ("job_start", "join", *REDO_KINDS, ATTESTATION):
                    self._remember(entry)
            except (ValueError, KeyError, TypeError, AuditError):
                if self._coordinator is not None:
                    raise NotAnAuditLogError(
                        f"entry {row[0]} of {self.path} is malformed; run swarm-audit verify on it"
                    ) from None

    def _remember(self, entry: Entry) -> None:
        record = parse_json_object(entry.payload)
        if entry.kind == "job_start" and entry.index == 0:
            self.job_id, self.coordinator_key = record["job_id"], _hex_key(record["coordinator_key"])
        elif entry.kind == "join":
            self._node_keys[record["node_id"]] = _hex_key(record["public_key"])
        elif entry.kind == ATTESTATION:
            self._attested.add((record["node_id"], record["phase"], record["step"]))
        elif entry.kind in REDO_KINDS:
            self._forget_attested_from(int(record["from_step"]))

    def _forget_attested_from(self, from_step: int) -> None:
        """After a resume event, the steps from `from_step` on are redone and may be attested again."""
        self._attested = {slot for slot in self._attested if slot[2] < from_step}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit mode).

    Inside a transaction already open (AuditLog.create's), it joins that one and leaves the ending to it.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._outermost = not connection.in_transaction

    def __enter__(self) -> None:
        if self._outermost:
            self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if self._outermost:
            self._connection.execute("ROLLBACK" if exc_type else "COMMIT")


def _connect_writer(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def _hex_key(value: Any) -> bytes:
    try:
        key = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise EventError(f"public key {value!r} is not hex") from None
    if len(key) != 32:
        raise EventError(f"public key has {len(key)} bytes; an Ed25519 key has 32")
    return key


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
