"""RFC 6962 / RFC 9162 Merkle tree hashing, inclusion proofs and consistency proofs.

Why this exact algorithm: a tree head signed over these roots can be checked by any Certificate
Transparency style verifier, not only by our code. The contract (RFC 6962 section 2.1):

- leaf hash  = SHA-256(0x00 ‖ entry bytes); interior node = SHA-256(0x01 ‖ left ‖ right);
- the tree of n > 1 leaves splits at k, the largest power of two strictly smaller than n;
- the root of the empty tree is SHA-256 of the empty string.

`MerkleTree` keeps the roots of every complete, aligned power-of-two subtree as leaves are appended, so
the root of any prefix and any proof costs O(log² n) hashes, and a verifier can check hundreds of tree
heads over a long log without rehashing it each time. The verifiers are RFC 9162 section 2.1.3.2 and
2.1.4.2 verbatim: they need only hashes, never the tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 6962's k."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only list of leaf hashes with RFC 6962 roots and proofs over any prefix of it."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        # _levels[h][i] is the root of leaves [i * 2**h, (i + 1) * 2**h); level 0 holds the leaf hashes.
        self._levels: list[list[bytes]] = [[]]
        for leaf in leaf_hashes:
            self.append(leaf)

    def __len__(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        """Add a leaf *hash* (already `leaf_hash(entry)`)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash has {HASH_SIZE} bytes, not {len(leaf)}")
        self._levels[0].append(leaf)
        level = 0
        while len(self._levels[level]) % 2 == 0:
            below = self._levels[level]
            if level + 1 == len(self._levels):
                self._levels.append([])
            self._levels[level + 1].append(node_hash(below[-2], below[-1]))
            level += 1

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first `size` leaves (all of them by default)."""
        size = len(self) if size is None else size
        self._check_size(size)
        return self._subtree(0, size) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path PATH(index, D[0:size]) of RFC 6962 section 2.1.1, leaf to root."""
        size = len(self) if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
        return self._path(index, 0, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[0:new_size]) of RFC 6962 section 2.1.2; empty when old_size is 0 or equal."""
        new_size = len(self) if new_size is None else new_size
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"a consistency proof needs 0 <= old size <= new size, got {old_size} and {new_size}")
        if old_size in (0, new_size):
            return []
        return self._subproof(old_size, 0, new_size, True)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= len(self):
            raise ValueError(f"tree size {size} is outside 0..{len(self)}")

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a non-empty range whose start is aligned as RFC 6962's recursion aligns it."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self._levels[n.bit_length() - 1][start // n]
        k = split_point(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def _path(self, index: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = split_point(n)
        if index < start + k:
            return self._path(index, start, start + k) + [self._subtree(start + k, end)]
        return self._path(index, start + k, end) + [self._subtree(start, start + k)]

    def _subproof(self, m: int, start: int, end: int, complete: bool) -> list[bytes]:
        """SUBPROOF(m, D[start:end], complete): m counts leaves from `start`."""
        n = end - start
        if m == n:
            return [] if complete else [self._subtree(start, end)]
        k = split_point(n)
        if m <= k:
            return self._subproof(m, start, start + k, complete) + [self._subtree(start + k, end)]
        return self._subproof(m - k, start + k, end, False) + [self._subtree(start, start + k)]


def tree_root(leaf_hashes: Sequence[bytes]) -> bytes:
    return MerkleTree(leaf_hashes).root()


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: is leaf hash `leaf` at `index` of the tree of `size` leaves with `root`?"""
    if not 0 <= index < size or any(len(h) != HASH_SIZE for h in (leaf, root, *path)):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn & 1 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2: is the tree of `old_size` leaves a prefix of the one of `new_size`?

    The degenerate cases follow the RFC's generation rules: equal sizes need an empty proof and equal roots;
    an empty old tree (root SHA-256("")) is a prefix of every tree, with an empty proof.
    """
    if any(len(h) != HASH_SIZE for h in (old_root, new_root, *proof)) or not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn & 1 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
