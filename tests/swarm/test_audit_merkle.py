"""RFC 6962 Merkle trees: published vectors, hand-built trees, and proofs over every small tree shape."""

import hashlib

import pytest

from swarm.audit.merkle import (
    EMPTY_ROOT, MerkleTree, leaf_hash, node_hash, split_point, tree_root, verify_consistency, verify_inclusion,
)  # fmt: skip

# Certificate Transparency's reference leaves and the root of each prefix (transparency-dev/merkle testonly).
CT_LEAVES = [bytes.fromhex(h) for h in
             ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]  # fmt: skip


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 section 2.1, over leaf hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def leaves(n: int) -> list[bytes]:
    return [leaf_hash(f"entry {i}".encode()) for i in range(n)]


def test_hashes_use_the_rfc_prefixes():
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_split_is_the_largest_power_of_two_below_n():
    assert [split_point(n) for n in (2, 3, 4, 5, 8, 9, 1000)] == [1, 2, 2, 4, 4, 8, 512]


def test_roots_match_the_certificate_transparency_vectors():
    tree = MerkleTree(leaf_hash(data) for data in CT_LEAVES)
    assert [tree.root(size).hex() for size in range(9)] == CT_ROOTS


def test_proofs_match_the_certificate_transparency_vectors():
    tree = MerkleTree(leaf_hash(data) for data in CT_LEAVES)
    assert [h.hex() for h in tree.inclusion_proof(5, 8)] == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
    assert [h.hex() for h in tree.consistency_proof(2, 8)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]


def test_small_trees_computed_by_hand():
    a, b, c, d, e = leaves(5)
    assert tree_root([a]) == a
    assert tree_root([a, b]) == node_hash(a, b)
    assert tree_root([a, b, c]) == node_hash(node_hash(a, b), c)
    assert tree_root([a, b, c, d, e]) == node_hash(node_hash(node_hash(a, b), node_hash(c, d)), e)
    tree = MerkleTree([a, b, c, d, e])
    assert tree.inclusion_proof(2) == [d, node_hash(a, b), e]
    assert tree.inclusion_proof(4) == [node_hash(node_hash(a, b), node_hash(c, d))]
    assert tree.consistency_proof(3, 5) == [c, d, node_hash(a, b), e]


def test_every_prefix_root_matches_the_rfc_recursion():
    hashes = leaves(70)
    tree = MerkleTree(hashes)
    for size in range(71):
        assert tree.root(size) == reference_root(hashes[:size]), size


def test_every_leaf_of_trees_up_to_40_has_a_verifying_inclusion_proof():
    tree = MerkleTree(leaves(40))
    for size in range(1, 41):
        root = tree.root(size)
        for index in range(size):
            path = tree.inclusion_proof(index, size)
            assert verify_inclusion(leaves(40)[index], index, size, path, root), (index, size)


def test_wrong_leaf_index_root_or_path_fails_inclusion():
    hashes = leaves(40)
    tree = MerkleTree(hashes)
    for size in range(2, 41):
        root = tree.root(size)
        for index in range(size):
            path = tree.inclusion_proof(index, size)
            leaf = hashes[index]
            assert not verify_inclusion(hashes[(index + 1) % size], index, size, path, root)
            assert not verify_inclusion(leaf, (index + 1) % size, size, path, root)
            assert not verify_inclusion(leaf, index, size, path, tree.root(size - 1))
            assert not verify_inclusion(leaf, index, size, path[:-1], root)
            assert not verify_inclusion(leaf, index, size, [*path, root], root)
            corrupted = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
            assert not verify_inclusion(leaf, index, size, corrupted, root)
    assert not verify_inclusion(hashes[0], 3, 3, tree.inclusion_proof(2, 3), tree.root(3))


def test_every_pair_of_sizes_up_to_33_has_a_verifying_consistency_proof():
    tree = MerkleTree(leaves(33))
    for new in range(0, 34):
        for old in range(0, new + 1):
            proof = tree.consistency_proof(old, new)
            assert verify_consistency(old, new, tree.root(old), tree.root(new), proof), (old, new)


def test_wrong_roots_or_proofs_fail_consistency():
    tree = MerkleTree(leaves(33))
    other = MerkleTree(leaves(34)[1:])
    for new in range(2, 34):
        for old in range(1, new):
            proof = tree.consistency_proof(old, new)
            old_root, new_root = tree.root(old), tree.root(new)
            assert not verify_consistency(old, new, other.root(old), new_root, proof)
            assert not verify_consistency(old, new, old_root, other.root(new), proof)
            assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
            assert not verify_consistency(old, new, old_root, new_root, [*proof, old_root])
            corrupted = [*proof[:-1], bytes([proof[-1][0] ^ 1]) + proof[-1][1:]]
            assert not verify_consistency(old, new, old_root, new_root, corrupted)
    assert not verify_consistency(4, 4, tree.root(4), tree.root(5), [])
    assert not verify_consistency(5, 4, tree.root(5), tree.root(4), [])


def test_out_of_range_requests_are_refused():
    tree = MerkleTree(leaves(5))
    with pytest.raises(ValueError):
        tree.root(6)
    with pytest.raises(ValueError):
        tree.inclusion_proof(5)
    with pytest.raises(ValueError):
        tree.consistency_proof(4, 3)
    with pytest.raises(ValueError):
        tree.append(b"short")
