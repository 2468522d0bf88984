"""What a node's reply can make the trainer hold (coordinator.chain.transport over swarm.p2p.framing.BoundedP2P,
on real hivemind P2P daemons on 127.0.0.1): a reply that never ends, or a frame declaring a terabyte,
fails the call with an error naming it, soon and without a retry, instead of growing the trainer's memory until
the call's timeout."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from coordinator.chain.stage import RemoteStage
from coordinator.chain.transport import Transport
from swarm.errors import SwarmConnectionError
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.framing import MAX_FRAME_BYTES, BoundedP2P
from swarm.p2p.rpc import FORWARD, STEP_STATE
from swarm.proto.blocks_pb2 import CallMeta, CallResult

MB = 1 << 20


async def _endless_tensor(stream_info, reader, writer):
    """A well-framed reply announcing one tensor of a million 1 MB chunks, sent for as long as it is read."""
    first = runtime_pb2.Tensor(buffer=bytes(MB), chunks=1_000_000, size=[1_000_000, MB // 4], dtype="float32")
    with contextlib.suppress(ConnectionError, OSError):
        await P2P.send_protobuf(runtime_pb2.ExpertResponse(
            metadata=CallResult(status=CallResult.OK, tensor_count=1).SerializeToString(), tensors=[first]), writer)
        for _ in range(1_000):
            await P2P.send_protobuf(runtime_pb2.ExpertResponse(tensors=[runtime_pb2.Tensor(buffer=bytes(MB))]), writer)


async def _terabyte_frame(stream_info, reader, writer):
    writer.write(P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    with contextlib.suppress(ConnectionError, OSError):
        for _ in range(1_000):
            writer.write(bytes(MB))
            await writer.drain()


@pytest.fixture
def lying_node():
    """A P2P peer whose `forward` runs `handler` (set by the test), and a trainer's Transport to it."""
    loop = LoopThread()
    node = loop.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), timeout=60)
    maddrs = [str(addr) for addr in loop.run(node.get_visible_maddrs(), timeout=10)]
    trainer = loop.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs), timeout=60)
    transport = Transport(BoundedP2P(trainer), loop, "job", timeout_s=60, direct_channels=False,
                          range_parameters=lambda start, end: 10_000 * (end - start))

    def serve(handler, method=FORWARD):
        loop.run(node.add_binary_stream_handler(method, handler), timeout=10)
        return transport, RemoteStage(node.peer_id, 0, 2, "liar")

    try:
        yield serve
    finally:
        transport.close()
        loop.run(node.shutdown(), timeout=30)
        loop.shutdown()


def _forward(transport: Transport, stage: RemoteStage):
    hidden = torch.zeros(2, 8, 16)
    mask = torch.ones(2, 8, dtype=torch.long)
    meta = CallMeta(job_id="job", block_start=0, block_end=2, step=0, train=False)
    return transport.call(stage, FORWARD, meta, [hidden, mask, torch.arange(8).expand(2, 8)])


@pytest.mark.parametrize("method", [FORWARD, STEP_STATE])
def test_a_reply_that_never_ends_fails_at_its_limit(lying_node, method):
    transport, stage = lying_node(_endless_tensor, method)
    started = time.monotonic()
    # forward: 4x its request (a few kB here) and a frame; step_state: 16x the range's 20,000 float32 parameters
    # and a frame
    limit = r"2[0-9]{6}" if method == FORWARD else 16 * 4 * 20_000 + MAX_FRAME_BYTES
    with pytest.raises(SwarmConnectionError, match=f"the {method.rsplit('.', 1)[-1]} reply is larger than its "
                                                   f"limit of {limit} bytes"):
        if method == FORWARD:
            _forward(transport, stage)
        else:
            transport.call(stage, method, CallMeta(job_id="job", block_start=0, block_end=2, step=0))
    assert time.monotonic() - started < 30  # not the call's 60 s timeout, and not retried
    assert "retried" not in stage.stream_bytes


def test_a_reply_frame_declaring_a_terabyte_fails_the_call_at_its_header(lying_node):
    transport, stage = lying_node(_terabyte_frame)
    started = time.monotonic()
    with pytest.raises(SwarmConnectionError, match="FrameTooLong: a frame of 1099511627776 bytes declared"):
        _forward(transport, stage)
    assert time.monotonic() - started < 30
