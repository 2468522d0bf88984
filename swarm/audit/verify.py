"""`verify_log`: check an audit log from its file alone, and name the first entry that cannot be trusted.

Checked, in log order (entries by index, each tree head as soon as the entries it covers have been read):

- rows: indices 0, 1, 2, ... without gaps, columns of the right types;
- the hash chain: each stored entry_hash is the hash of the row's contents, and each prev_hash is the
  stored hash of the entry before it (an edited entry fails the first check; a reordered, inserted or
  deleted one the second);
- entry 0 is the `job_start` event, signed by the coordinator key it carries (optionally pinned by the
  caller, since a forger could start a whole new log with a key of their own);
- coordinator events: authored and signed by that key, for this job, with the fields their kind needs;
  `join` binds a node id to its public key (the id must be the key's fingerprint);
- attestations: well-formed, for this job, by a node that joined earlier, signed by that node's key over
  the stored bytes, and the only one of their (node, phase, step) — an exact copy of an earlier entry is
  reported as a duplicate, and a copied signature over a payload with another step fails its signature.
  The one exception is a coordinator's `resume` event (a restart after a crash, redoing work from step
  `from_step`) or `rollback` event (every range went back to a step checkpoint after a range lost its last
  replica): a (node, phase, step) with step >= from_step attested before it may be attested once more after it;
- replica groups: the valid attestations of one block range at one step (a group once more than one node
  attests the range there, or one names the replicas it summed gradients with in `averaged_with`) all
  attest the same weights and AdamW state after the step and the same `averaged_with`, which lists exactly
  the nodes that attested the range at that step, each of them assigned that range (an `assignment` event
  before its attestation). A group is checked once the log reaches a later step, a `resume` or `rollback`, or its end;
  a problem names the attestation that breaks the rule;
- tree heads: signed by the coordinator, never shrinking or going back in time, root equal to the Merkle
  root of the entries they cover, RFC 6962 consistent with the previous valid tree head, and covering no
  more entries than the log holds (a truncated log fails here).

A problem with an entry names that entry. A problem with a tree head names the first entry the head fails
to vouch for: the size of the last valid head before it, or, for a truncated log, the first missing entry.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

from swarm.audit import db
from swarm.audit.attestation import Attestation
from swarm.audit.canonical import parse_json_object
from swarm.audit.entry import ATTESTATION, EVENT_FIELDS, REDO_KINDS, Entry, TreeHead
from swarm.audit.errors import AttestationError
from swarm.audit.merkle import MerkleTree, verify_consistency
from swarm.block_range import BlockRange
from swarm.identity import fingerprint, verify


@dataclass(frozen=True)
class Problem:
    index: int  # the first entry whose trust fails
    reason: str
    tree_head: int | None = None  # sequence number of the tree head at fault, if a tree head is

    def __str__(self) -> str:
        return f"entry {self.index}: {self.reason}"


@dataclass
class VerifyReport:
    path: Path
    job_id: str = ""
    coordinator: str = ""  # fingerprint of the key in job_start
    entries: int = 0
    attestations: int = 0
    nodes: int = 0
    tree_heads: int = 0
    signed_size: int = 0  # entries covered by the last valid tree head
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        unsigned = self.entries - self.signed_size
        return (
            f"{self.entries} entries ({self.attestations} attestations from {self.nodes} nodes) in job "
            f"{self.job_id!r}, coordinator {self.coordinator}; {self.tree_heads} signed tree heads, the last "
            f"covering {self.signed_size} entries" + (f"; {unsigned} newer entries not yet signed" if unsigned else "")
        )


# What the replicas of a range must agree on at a step, and how a disagreement reads.
_AGREED = {
    "adapter_sha256_after": "attest different weights after the step",
    "optimizer_sha256_after": "attest different optimizer state after the step",
    "averaged_with": "say they summed gradients in different groups",
}


class _Bad(Exception):
    """One entry's or tree head's problem (internal control flow); `index` overrides the default entry."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.index = index


def verify_log(path: str | Path, coordinator: str | None = None) -> VerifyReport:
    """Verify the log at `path` (a run directory or audit.db); `coordinator` pins the expected key fingerprint."""
    connection = db.connect_readonly(path)
    try:
        return _Verifier(db.resolve(path), coordinator).run(connection)
    finally:
        connection.close()


class _Verifier:
    def __init__(self, path: Path, pinned: str | None) -> None:
        self.report = VerifyReport(path)
        self.pinned = pinned.lower() if pinned else None
        self.tree = MerkleTree()
        self.prev_hash: bytes | None = None
        self.coordinator_key: bytes | None = None
        self.node_keys: dict[str, bytes] = {}
        self.slots: dict[tuple[str, str, int], int] = {}
        self.copies: dict[bytes, tuple[int, int]] = {}  # payload+signature digest -> (entry index, step)
        self.last_head: TreeHead | None = None
        self.assigned: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # node -> (entry, start, end)
        # (phase, step, block start, block end) -> its valid attestations in log order, until checked
        self.groups: dict[tuple[str, int, int, int], list[tuple[int, Attestation]]] = {}

    def run(self, connection) -> VerifyReport:
        heads = db.head_rows(connection)
        self.report.tree_heads = len(heads)
        pending = 0
        for row in db.iter_rows(connection):
            while pending < len(heads) and _size_of(heads[pending]) <= len(self.tree):
                self._check_head(heads[pending])
                pending += 1
            if row[0] != len(self.tree):
                self._problem(len(self.tree), f"entries {len(self.tree)}..{row[0] - 1} are missing")
                while len(self.tree) < row[0]:  # keep leaf positions equal to indices
                    self.tree.append(bytes(32))
            self._check_entry(row)
        self._check_groups(lambda step: True)
        self.report.entries = len(self.tree)
        if not self.report.entries:
            self._problem(0, "the log has no entries, not even its job_start")
        for row in heads[pending:]:
            self._check_head(row)
        self.report.nodes = len(self.node_keys)
        self.report.signed_size = self.last_head.tree_size if self.last_head else 0
        return self.report

    def _problem(self, index: int, reason: str, tree_head: int | None = None) -> None:
        self.report.problems.append(Problem(index, reason, tree_head))

    # -- entries ---------------------------------------------------------------------------------------

    def _check_entry(self, row: tuple) -> None:
        index = row[0]
        try:
            entry = db.entry_from_row(row)
        except ValueError as error:
            self._problem(index, f"malformed row: {error}")
            self.tree.append(hashlib.sha256(repr(row).encode()).digest())
            self.prev_hash = row[7] if isinstance(row[7], bytes) else None
            return
        reasons = []
        for check in (self._check_chain, self._check_content):  # content checks run anyway: they register keys
            try:
                check(entry)
            except _Bad as bad:
                reasons.append(str(bad))
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                # The file is adversarial input: a payload of an unforeseen shape is a finding, not a crash.
                reasons.append(f"malformed payload ({type(error).__name__}: {error})")
        if reasons:
            self._problem(index, reasons[0])
        self.tree.append(entry.leaf_hash)
        self.prev_hash = entry.stored_hash

    def _check_chain(self, entry: Entry) -> None:
        if entry.computed_hash != entry.stored_hash:
            raise _Bad("its stored entry_hash does not match its contents (edited, or moved from another index)")
        expected = self.prev_hash if entry.index else bytes(32)
        if entry.prev_hash != expected:
            raise _Bad("its prev_hash is not the hash of the entry before it (entries reordered, inserted or deleted)")

    def _check_content(self, entry: Entry) -> None:
        if entry.index == 0:
            return self._check_job_start(entry)
        if entry.kind == "job_start":
            raise _Bad("a second job_start")
        if self.coordinator_key is None:
            raise _Bad("cannot be checked: the log has no valid job_start to take the coordinator key from")
        if entry.kind == ATTESTATION:
            return self._check_attestation(entry)
        if entry.kind not in EVENT_FIELDS:
            raise _Bad(f"unknown entry kind {entry.kind!r}")
        record = self._check_event(entry, self.coordinator_key)
        if entry.kind in REDO_KINDS:
            self._resume(entry.kind, record["from_step"])
        if entry.kind == "assignment":
            self.assigned[record["node_id"]].append((entry.index, record["block_start"], record["block_end"]))
        if entry.kind == "join":
            node_id, key = record["node_id"], _key(record["public_key"])
            if node_id != fingerprint(key):
                raise _Bad(f"join names node {node_id} but its key's fingerprint is {fingerprint(key)}")
            if self.node_keys.setdefault(node_id, key) != key:
                raise _Bad(f"node {node_id} joins again with a different key")

    def _check_job_start(self, entry: Entry) -> None:
        if entry.kind != "job_start":
            raise _Bad(f"the log must begin with job_start, not {entry.kind!r}")
        try:
            key = _key(parse_json_object(entry.payload).get("coordinator_key"))
        except ValueError as error:
            raise _Bad(f"job_start payload unreadable: {error}") from None
        record = self._check_event(entry, key)
        if self.pinned and fingerprint(key) != self.pinned:
            raise _Bad(f"the log was started by coordinator {fingerprint(key)}, not the expected {self.pinned}")
        self.coordinator_key = key
        self.report.job_id, self.report.coordinator = record["job_id"], fingerprint(key)

    def _check_event(self, entry: Entry, key: bytes) -> dict:
        if entry.author != fingerprint(key):
            raise _Bad(f"{entry.kind} event authored by {entry.author}, not the coordinator {fingerprint(key)}")
        if not verify(key, entry.signature, entry.payload):
            raise _Bad(f"{entry.kind} event signature does not verify under the coordinator key")
        try:
            record = parse_json_object(entry.payload)
        except ValueError as error:
            raise _Bad(f"{entry.kind} payload unreadable: {error}") from None
        if record.get("kind") != entry.kind:
            raise _Bad(f"payload says kind {record.get('kind')!r} but the entry is {entry.kind!r}")
        if entry.index and record.get("job_id") != self.report.job_id:
            raise _Bad(f"event for job {record.get('job_id')!r}, not {self.report.job_id!r}")
        missing = [name for name in EVENT_FIELDS[entry.kind] if name not in record]
        if missing or not isinstance(record.get("job_id"), str):
            raise _Bad(f"{entry.kind} event lacks {', '.join(missing) or 'job_id'}")
        return record

    def _resume(self, kind: str, from_step: object) -> None:
        """Work from `from_step` on is redone after this event: its earlier attestations no longer block a new one."""
        if type(from_step) is not int or from_step < 0:
            raise _Bad(f"{kind} event's from_step {from_step!r} is not a step id")
        self.slots = {slot: index for slot, index in self.slots.items() if slot[2] < from_step}
        self.copies = {copy: seen for copy, seen in self.copies.items() if seen[1] < from_step}
        self._check_groups(lambda step: step < from_step)
        self.groups.clear()  # the attestations of redone steps no longer count

    def _check_attestation(self, entry: Entry) -> None:
        self.report.attestations += 1
        try:
            attestation = Attestation.from_bytes(entry.payload)
        except AttestationError as error:
            raise _Bad(f"malformed attestation: {error}") from None
        node = attestation.node_id
        if entry.author != node:
            raise _Bad(f"attestation names node {node} but the entry's author is {entry.author}")
        key = self.node_keys.get(node)
        if key is None:
            raise _Bad(f"attestation signed by node {node}, which is not registered (no join before it)")
        if not verify(key, entry.signature, entry.payload):
            raise _Bad(f"attestation signature does not verify under node {node}'s key (payload altered?)")
        if attestation.job_id != self.report.job_id:
            raise _Bad(f"attestation for job {attestation.job_id!r}, not {self.report.job_id!r}")
        copy = hashlib.sha256(entry.payload + b"\x00" + entry.signature).digest()
        if copy in self.copies:
            raise _Bad(f"exact duplicate of entry {self.copies[copy][0]} (a replayed attestation)")
        self.copies[copy] = (entry.index, attestation.step)
        slot = (node, attestation.phase, attestation.step)
        if slot in self.slots:
            first = self.slots[slot]
            raise _Bad(f"node {node} attested phase {slot[1]!r} step {slot[2]} twice; first at entry {first}")
        self.slots[slot] = entry.index
        self._check_groups(lambda step: step < attestation.step)  # a step's attestations come before the next's
        group = (attestation.phase, attestation.step, attestation.block_start, attestation.block_end)
        self.groups.setdefault(group, []).append((entry.index, attestation))

    # -- replica groups --------------------------------------------------------------------------------

    def _check_groups(self, due: Callable[[int], bool]) -> None:
        """Check, and forget, the groups of every step `due` says is complete."""
        for key in sorted(key for key in self.groups if due(key[1])):
            self._check_group(key, self.groups.pop(key))

    def _check_group(self, key: tuple[str, int, int, int], members: list[tuple[int, Attestation]]) -> None:
        phase, step, start, end = key
        first_index, first = members[0]
        if len(members) == 1 and not first.averaged_with:
            return  # one node stepped alone on its own gradient
        where = f"step {step} ({phase}) blocks {BlockRange(start, end)}"
        attesters = [attestation.node_id for _, attestation in members]
        for name, what in _AGREED.items():
            index, other = next(((i, a) for i, a in members if getattr(a, name) != getattr(first, name)), (0, None))
            if other is not None:
                self._problem(index, f"{where}: replicas {what}: node {first.node_id} (entry {first_index}) "
                                     f"{_shown(first, name)}, node {other.node_id} {_shown(other, name)}")
        seen = set()
        for index, attestation in members:
            if attestation.averaged_with in seen:
                continue
            seen.add(attestation.averaged_with)
            if set(attestation.averaged_with) != set(attesters):
                claimed = ", ".join(attestation.averaged_with) or "no one (it says it stepped alone)"
                self._problem(index, f"{where}: node {attestation.node_id} summed gradients with {claimed}, but "
                                     f"the nodes that attested these blocks at this step are {', '.join(attesters)}")
        for index, attestation in members:
            node = attestation.node_id
            if not any(at < index and (s, e) == (start, end) for at, s, e in self.assigned.get(node, ())):
                self._problem(index, f"{where}: node {node} attests these blocks as a replica, but no assignment "
                                     f"event before its attestation gives it blocks {BlockRange(start, end)}")

    # -- tree heads ------------------------------------------------------------------------------------

    def _check_head(self, row: tuple) -> None:
        sequence = row[0]
        covered = self.last_head.tree_size if self.last_head else 0
        try:
            head = db.head_from_row(row)
            self._check_head_fields(head)
        except ValueError as error:
            self._problem(covered, f"tree head {sequence}: malformed row: {error}", sequence)
        except _Bad as bad:
            index = covered if bad.index is None else bad.index
            self._problem(index, f"tree head {sequence} (size {head.tree_size}): {bad}", sequence)
        else:
            self.last_head = head

    def _check_head_fields(self, head: TreeHead) -> None:
        if self.coordinator_key is None:
            raise _Bad("cannot be checked: the log has no valid job_start to take the coordinator key from")
        if not verify(self.coordinator_key, head.signature, head.message(self.report.job_id)):
            raise _Bad("signature does not verify under the coordinator key (tree head altered or forged)")
        last = self.last_head
        if last and head.tree_size < last.tree_size:
            raise _Bad(f"shrinks the log from {last.tree_size} entries (tree head {last.sequence})", head.tree_size)
        if last and head.timestamp_ms < last.timestamp_ms:
            raise _Bad(f"is dated before tree head {last.sequence}")
        if head.tree_size > len(self.tree):
            raise _Bad(
                f"signs {head.tree_size} entries but the log has {len(self.tree)}: entries were removed", len(self.tree)
            )
        if head.root_hash != self.tree.root(head.tree_size):
            raise _Bad(f"root does not match the Merkle root of entries 0..{head.tree_size - 1}")
        if last and not verify_consistency(
            last.tree_size, head.tree_size, last.root_hash, head.root_hash,
            self.tree.consistency_proof(last.tree_size, head.tree_size),
        ):  # fmt: skip
            raise _Bad(f"is not consistent with tree head {last.sequence}")


def _shown(attestation: Attestation, name: str) -> str:
    value = getattr(attestation, name)
    return f"[{', '.join(value)}]" if name == "averaged_with" else value[:12]


def _size_of(head_row: tuple) -> int:
    return head_row[1] if isinstance(head_row[1], int) else 0


def _key(value: object) -> bytes:
    try:
        key = bytes.fromhex(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _Bad(f"public key {value!r} is not hex") from None
    if len(key) != 32:
        raise _Bad(f"public key has {len(key)} bytes; an Ed25519 key has 32")
    return key
