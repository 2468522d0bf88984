"""Inference sessions on a node: cached positions give what a full forward gives, and every way a session
can be lost (ended, idle, evicted for memory, weights changed, wrong length) is answered so the trainer
re-sends the prefix; one session over the bound alone is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from node.inference_sessions import InferenceSessions, MissingSession, SessionTooLarge
from swarm.p2p.rpc import END_SESSION, INFER
from swarm.proto.blocks_pb2 import CallResult
from tests.node.conftest import HIDDEN, train_step
from tests.node.in_process import call, meta, run, serving


def _left_padded(generator: torch.Generator, batch: int = 3, length: int = 9):
    """Hidden states of a left-padded batch (row 1 starts at 3, row 2 at 6), its mask and positions."""
    hidden = torch.randn(batch, length, HIDDEN, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return hidden, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _infer_in_pieces(shard, session_id: str, hidden, mask, positions, pieces: list[int]) -> torch.Tensor:
    outputs, sent = [], 0
    for size in pieces:
        output, kept = shard.infer(session_id, sent, hidden[:, sent:sent + size], mask[:, :sent + size],
                                   positions[:, sent:sent + size])
        sent += size
        assert kept == sent
        outputs.append(output)
    return torch.cat(outputs, dim=1)


def test_a_prompt_then_one_position_at_a_time_gives_the_full_forward(make_shard, generator):
    shard = make_shard()
    hidden, mask, positions = _left_padded(generator)
    full = shard.forward(0, 0, False, hidden, mask, positions)
    cached = _infer_in_pieces(shard, "s", hidden, mask, positions, [5, 1, 1, 1, 1])
    real = mask.bool()
    assert (cached - full)[real].abs().max() <= 1e-5
    assert len(shard.sessions) == 1


def test_a_session_lost_in_any_way_is_answered_missing(make_shard, generator):
    shard = make_shard()
    hidden, mask, positions = _left_padded(generator)
    _infer_in_pieces(shard, "s", hidden, mask, positions, [6])
    with pytest.raises(MissingSession, match="holds 6 positions, not 5"):
        shard.infer("s", 5, hidden[:, 5:6], mask[:, :6], positions[:, 5:6])
    with pytest.raises(MissingSession, match="no session s"):  # the mismatch dropped it
        shard.infer("s", 6, hidden[:, 6:7], mask[:, :7], positions[:, 6:7])
    _infer_in_pieces(shard, "t", hidden, mask, positions, [6])
    train_step(shard, 0, generator)  # the weights change: keys and values computed before no longer hold
    with pytest.raises(MissingSession, match="weights changed"):
        shard.infer("t", 6, hidden[:, 6:7], mask[:, :7], positions[:, 6:7])


def test_a_call_that_does_not_fit_its_session_is_refused(make_shard, generator):
    shard = make_shard()
    hidden, mask, positions = _left_padded(generator)
    with pytest.raises(ValueError, match=r"attention mask must be \[batch, 0 \+ 4\]"):
        shard.infer("s", 0, hidden[:, :4], mask, positions[:, :4])
    with pytest.raises(ValueError, match="session id"):
        shard.infer("", 0, hidden, mask, positions)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _grow(sessions: InferenceSessions, session_id: str, past: int, size: int, nbytes_per_position: int) -> int:
    """A stand-in compute: a cache that grows by `nbytes_per_position` per position."""
    class Layer:
        is_initialized = True

        def __init__(self, length):
            self.keys = torch.zeros(length * nbytes_per_position // 8, dtype=torch.float32)
            self.values = torch.zeros(length * nbytes_per_position // 8, dtype=torch.float32)

    class Cache:
        layers: list = []

    def compute(cache):
        cache.layers = [Layer(past + size)]
        return torch.zeros(1, size, 1)

    _, kept = sessions.run(session_id, past, 0, Cache, compute)
    return kept


def test_the_least_recently_used_session_makes_room_and_an_idle_one_is_dropped():
    clock = _Clock()
    sessions = InferenceSessions(max_bytes=1280, idle_s=10.0, clock=clock)  # 128 bytes a position below
    assert _grow(sessions, "a", 0, 4, 128) == 4  # 512 bytes
    clock.now = 1.0
    assert _grow(sessions, "b", 0, 4, 128) == 4  # 1024 in all
    clock.now = 2.0
    assert _grow(sessions, "a", 4, 1, 128) == 5  # a is now the most recently used: 640 + 512
    clock.now = 3.0
    assert _grow(sessions, "c", 0, 3, 128) == 3  # 1536: b (least recently used) goes
    assert sessions.nbytes == 1024 and len(sessions) == 2
    with pytest.raises(MissingSession, match="no session b"):
        _grow(sessions, "b", 4, 1, 128)
    clock.now = 12.5  # a was last used at 2.0, c at 3.0: only a has been idle for more than 10 s
    with pytest.raises(MissingSession, match="no session a"):
        _grow(sessions, "a", 5, 1, 128)
    assert _grow(sessions, "c", 3, 1, 128) == 4


def test_a_session_over_the_bound_by_itself_is_refused_with_the_bound_named():
    sessions = InferenceSessions(max_bytes=1 << 20)
    with pytest.raises(SessionTooLarge, match=r"needs 2\.0 MiB .* over this node's bound of 1\.0 MiB"):
        _grow(sessions, "big", 0, 2, 1 << 20)
    assert len(sessions) == 0


def test_the_block_server_answers_infer_and_end_session_calls(make_shard, generator):
    hidden, mask, positions = _left_padded(generator)

    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            first, outputs, _ = await call(trainer, node.peer_id, INFER, meta(session_id="s", session_length=0),
                                           [hidden[:, :8], mask[:, :8], positions[:, :8]])
            assert first.status == CallResult.OK and first.session_length == 8 and outputs[0].shape == (3, 8, HIDDEN)
            ended, _, _ = await call(trainer, node.peer_id, END_SESSION, meta(session_id="s"))
            assert ended.status == CallResult.OK and len(server.shard.sessions) == 0
            lost, outputs, _ = await call(trainer, node.peer_id, INFER, meta(session_id="s", session_length=8),
                                          [hidden[:, 8:], mask, positions[:, 8:]])
            assert lost.status == CallResult.MISSING_SESSION and "no session s" in lost.error and not outputs
            server.shard.sessions.max_bytes = 100
            refused, _, _ = await call(trainer, node.peer_id, INFER, meta(session_id="s", session_length=0),
                                       [hidden, mask, positions])
            assert refused.status == CallResult.ERROR and "--session-memory-mb" in refused.error

    run(scenario)
