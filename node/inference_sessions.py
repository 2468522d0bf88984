"""A node's inference sessions: for each generation batch the trainer opened, the keys and values its blocks
computed for every position so far, so each new token costs one position instead of the whole prefix.

Sessions are a cache, never state the job depends on: one that is evicted (over the memory bound, idle too
long, the weights changed by a step or phase since it started, the node restarted) is answered with
`MissingSession`, and the trainer re-sends the prefix, which gives the same keys and values again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module is imported by the CLI before torch, for its defaults
    import torch
    from transformers.cache_utils import Cache

DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_IDLE_S = 120.0


class MissingSession(Exception):
    """An infer call continues a session this node does not hold (or not at the length the trainer says)."""


class SessionTooLarge(ValueError):
    """One session's keys and values alone exceed the node's bound: the trainer must send smaller batches."""


@dataclass
class _Session:
    cache: Cache
    length: int  # positions whose keys and values the cache holds
    weights_version: int  # the shard's weights the keys and values were computed with
    last_used: float
    nbytes: int = 0


def cache_bytes(cache: Cache) -> int:
    return sum(tensor.numel() * tensor.element_size()
               for layer in cache.layers if getattr(layer, "is_initialized", False)
               for tensor in (layer.keys, layer.values))


class InferenceSessions:
    """Sessions by id, least recently used first, within `max_bytes` of keys and values in all."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, idle_s: float = DEFAULT_IDLE_S,
                 clock: Callable[[], float] = time.monotonic):
        if max_bytes < 0 or idle_s <= 0:
            raise ValueError(f"session memory must be >= 0 bytes and idle timeout > 0 s, got {max_bytes}, {idle_s}")
        self.max_bytes, self.idle_s, self.clock = max_bytes, idle_s, clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return sum(session.nbytes for session in self._sessions.values())

    def run(self, session_id: str, past_length: int, weights_version: int, new_cache: Callable[[], Cache],
            compute: Callable[[Cache], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """`compute(cache)` over the session's cache (a fresh one when `past_length` is 0), which it extends by
        the call's positions; returns its output and the positions the node now keeps. Other sessions, least
        recently used first, make room; a session over the bound by itself is dropped and refused."""
        if not session_id:
            raise ValueError("an infer call needs a session id")
        now = self.clock()
        self._drop_idle(now)
        if past_length == 0:
            self._sessions.pop(session_id, None)
            session = _Session(new_cache(), 0, weights_version, now)
        else:
            session = self._sessions.pop(session_id, None)
            if session is None:
                raise MissingSession(f"no session {session_id} on this node (evicted, idle, or never opened)")
            if session.length != past_length or session.weights_version != weights_version:
                why = (f"holds {session.length} positions, not {past_length}" if session.length != past_length
                       else "the weights changed since it started")
                raise MissingSession(f"session {session_id} {why}")
        output = compute(session.cache)
        session.length = past_length + output.shape[1]
        session.nbytes, session.last_used = cache_bytes(session.cache), now
        if session.nbytes > self.max_bytes:
            raise SessionTooLarge(
                f"inference session {session_id} needs {session.nbytes / 2**20:.1f} MiB of keys and values at "
                f"{session.length} positions, over this node's bound of {self.max_bytes / 2**20:.1f} MiB "
                "(swarm-node join --session-memory-mb); generate in smaller batches (eval.batch_size)")
        self._sessions[session_id] = session
        while self.nbytes > self.max_bytes:
            self._sessions.popitem(last=False)
        return output, session.length

    def end(self, session_id: str) -> bool:
        """Free a session; False when the node did not hold it."""
        return self._sessions.pop(session_id, None) is not None

    def clear(self) -> None:
        self._sessions.clear()

    def _drop_idle(self, now: float) -> None:
        for session_id in [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_s]:
            del self._sessions[session_id]
