"""BlockServers in one process and one event loop, called as the trainer calls them.

`LocalP2P` is hivemind's P2P as far as BlockServer and GradientReducer use it: a handler one peer registers
is called directly by another, with the caller as the context's remote id, so the server code runs exactly as
behind libp2p, minus the sockets (and the p2pd subprocess).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from node.block_server import BlockServer
from swarm.identity import Identity
from swarm.p2p.rpc import BACKWARD, FORWARD, PHASE, STEP, reply_tensor_count
from swarm.p2p.tensors import aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from tests.node.conftest import END, START, micro_batch, output_gradient

JOB = "job-1"
PHASE_NAME = "sft-1"
MAX_REQUEST_BYTES = 1 << 20


class LocalP2P:
    """One peer of an in-process network (`network`: peer id -> that peer's handlers by name)."""

    def __init__(self, network: dict[PeerID, dict], name: str):
        self.peer_id = PeerID(name.encode())
        self.handlers = network.setdefault(self.peer_id, {})
        self.network = network

    async def add_binary_stream_handler(self, name, stream):
        self.handlers[name] = stream.handler  # node.call_stream.CallStream: its handler, without the framing

    async def iterate_protobuf_handler(self, peer: PeerID, name: str, requests, output_type):
        return self.network[peer][name](requests, P2PContext(handle_name=name, local_id=peer, remote_id=self.peer_id))


@dataclass
class Exchange:
    """The messages of one call both ways (their sizes are what nodes count)."""

    requests: list
    responses: list

    @property
    def request_bytes(self) -> int:
        return sum(message.ByteSize() for message in self.requests)

    @property
    def response_bytes(self) -> int:
        return sum(message.ByteSize() for message in self.responses)


async def call(caller: LocalP2P, peer: PeerID, method: str, meta: CallMeta, tensors=()
               ) -> tuple[CallResult, list, Exchange]:
    """`method` of `peer`, called by `caller`: the result, the reply's tensors, and the messages both ways."""
    requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), list(tensors))
    stream = await caller.iterate_protobuf_handler(peer, method, aiter_list(requests), runtime_pb2.ExpertResponse)
    responses = []

    async def recorded():
        async for message in stream:
            responses.append(message)
            yield message

    # read as the trainer does: up to the reply's last tensor, then close (the node holds its end open until then)
    received = recorded()
    metadata, outputs, _ = await from_messages(received, tensor_count=reply_tensor_count)
    await stream.aclose()
    return CallResult.FromString(metadata), outputs, Exchange(requests, responses)


def meta(**fields) -> CallMeta:
    return CallMeta(**{"job_id": JOB, "phase": PHASE_NAME, "block_start": START, "block_end": END, **fields})


def run(scenario) -> None:
    """Run `scenario(network, trainer)` on a fresh event loop: the peers' handlers, and the trainer's P2P."""
    network: dict = {}
    asyncio.run(scenario(network, LocalP2P(network, "trainer")))


@contextlib.asynccontextmanager
async def serving(shard, network: dict, name: str, trainer: LocalP2P, channel_host: str | None = None):
    """A BlockServer for `shard` as peer `name`, serving `trainer`'s calls, in the trainer's first phase;
    (server, its P2P). With `channel_host`, the server's direct data channel listens there too."""
    p2p = LocalP2P(network, name)
    server = BlockServer(shard, JOB, Identity.generate(), trainer.peer_id, MAX_REQUEST_BYTES)
    await server.add_handlers(p2p, channel_host=channel_host)
    configured, _, _ = await call(trainer, p2p.peer_id, PHASE, meta(phase_kind="sft", adapter_action="continue",
                                                                     lora_seed="0"))
    assert configured.status == CallResult.OK and shard.phase_name == PHASE_NAME
    try:
        yield server, p2p
    finally:
        if server.channel is not None:
            await server.channel.close()
        server.shutdown()


def random_work(generator: torch.Generator, micro_batches=(0,)) -> dict[int, tuple[list, torch.Tensor]]:
    """Micro-batch id -> (forward inputs, output gradient)."""
    return {micro: (micro_batch(generator), output_gradient(generator)) for micro in micro_batches}


async def train(trainer: LocalP2P, node: LocalP2P, step: int, work: dict[int, tuple[list, torch.Tensor]]
                ) -> list[Exchange]:
    """Forward (train) and backward of each micro-batch of `work`; the calls' exchanges."""
    exchanges = []
    for micro, (inputs, grad) in work.items():
        for method, call_meta, tensors in ((FORWARD, meta(step=step, micro_batch=micro, train=True), inputs),
                                           (BACKWARD, meta(step=step, micro_batch=micro), [grad])):
            result, _, exchange = await call(trainer, node.peer_id, method, call_meta, tensors)
            assert result.status == CallResult.OK, result.error
            exchanges.append(exchange)
    return exchanges


async def apply_step(trainer: LocalP2P, node: LocalP2P, step: int, learning_rate: float = 0.01, **fields
                     ) -> CallResult:
    result, _, _ = await call(trainer, node.peer_id, STEP, meta(step=step, learning_rate=learning_rate, **fields))
    assert result.status == CallResult.OK, result.error
    return result
