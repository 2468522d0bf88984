"""The trainer's chain without a network: how it spreads micro-batches over replicas (measured latency, calls in
flight), what it keeps of a micro-batch until the step, and how it counts the bytes of a lost attempt."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from coordinator.chain import RangeLostError, RemoteChain, RemoteStage
from coordinator.chain.routing import PROBE_AFTER
from swarm.errors import RemoteBlockError
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.rpc import BACKWARD, FORWARD
from swarm.p2p.tensors import aiter_list, to_messages
from swarm.proto.blocks_pb2 import CallResult


def chain_of(*latencies: float | None) -> RemoteChain:
    stages = [RemoteStage(peer_id=None, start=0, end=2, node_id=f"node{i}", latency_s=latency)
              for i, latency in enumerate(latencies)]
    return RemoteChain(p2p=None, loop=None, stages=stages, job_id="job", timeout_s=10)


def picks(chain: RemoteChain, count: int, concurrent: int = 1) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _ in range(count // concurrent):
        routes = [chain.route() for _ in range(concurrent)]
        for route in routes:
            counts[route[0].node_id] = counts.get(route[0].node_id, 0) + 1
            chain.release(route)
    return counts


def test_a_slow_replica_gets_fewer_micro_batches_but_is_still_measured():
    counts = picks(chain_of(0.01, 0.2), 90)
    assert counts["node1"] == 90 // (PROBE_AFTER + 1)  # only the probes that re-measure it
    assert counts["node0"] == 90 - counts["node1"]


def test_equal_replicas_share_concurrent_micro_batches():
    assert picks(chain_of(0.05, 0.05), 40, concurrent=2) == {"node0": 20, "node1": 20}


def test_only_ranges_with_another_replica_keep_a_micro_batchs_input_and_gradient_until_the_step():
    stages = [RemoteStage(peer_id=None, start=0, end=2, node_id="alone"),
              RemoteStage(peer_id=None, start=2, end=4, node_id="first"),
              RemoteStage(peer_id=None, start=2, end=4, node_id="second")]
    chain = RemoteChain(p2p=None, loop=None, stages=stages, job_id="job", timeout_s=10)
    chain.protocol.forward_one = lambda index, route, hidden, *rest: hidden + 1
    chain.protocol.backward_one = lambda stage, grad, *rest: grad * 2
    hidden, mask, positions = torch.zeros(1, 3, 4), torch.ones(1, 3), torch.arange(3).unsqueeze(0)
    route = chain.route()
    _, inputs = chain.forward(hidden, mask, positions, step=7, micro_batch=0, train=True, route=route)
    chain.backward(torch.ones(1, 3, 4), inputs, mask, positions, step=7, micro_batch=0, route=route)
    record = chain.protocol.records[7][0]
    assert record.inputs[0] is None and record.grads[0] is None  # a lone replica's share cannot be moved
    assert torch.equal(record.inputs[1], hidden + 1) and torch.equal(record.grads[1], torch.ones(1, 3, 4))


def test_calls_in_flight_count_against_a_replica():
    chain = chain_of(0.05, 0.08)
    first, second = chain.route(), chain.route()
    assert (first[0].node_id, second[0].node_id) == ("node0", "node1")  # 2 x 0.05 > 0.08


def test_an_unmeasured_replica_counts_as_the_fastest_measured_one():
    chain = chain_of(0.05, 0.2, None)
    first, second = chain.route(), chain.route()
    assert first[0].node_id == "node0"  # ties with node2's 0.05 and comes first
    assert second[0].node_id == "node2"  # 0.05 beats node0's 2 x 0.05 and node1's 0.2


def test_a_range_without_replicas_fails_the_route_naming_why_its_last_one_went():
    chain = chain_of(0.05)
    chain.drop(chain.groups[0][0], "did not answer forward within 10 s")
    with pytest.raises(RangeLostError, match=r"blocks 0..1 lost their last replica \(node node0 \(blocks 0..1\): "
                                             r"did not answer forward"):
        chain.route()


def test_replicas_are_grouped_by_range_in_block_order():
    stages = [RemoteStage(None, 3, 6, "b"), RemoteStage(None, 0, 3, "a"), RemoteStage(None, 3, 6, "c")]
    chain = RemoteChain(p2p=None, loop=None, stages=stages, job_id="job", timeout_s=10)
    assert [[s.node_id for s in group] for group in chain.groups] == [["a"], ["b", "c"]]
    assert chain.replicas == 2 and [s.node_id for s in chain.route()] == ["a", "b"]


class _FlakyPeer:
    """Stands in for the P2P client: drops the first call without a reply, answers the next with one tensor."""

    def __init__(self):
        self.calls = 0

    async def iterate_protobuf_handler(self, peer, method, requests, response_type):
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("the peer closed the stream without answering")
        reply = to_messages(runtime_pb2.ExpertResponse, CallResult(status=CallResult.OK).SerializeToString(),
                            [torch.ones(2, 3)])
        return aiter_list(reply)


def test_a_lost_attempt_counts_as_retried_traffic_not_as_the_streams():
    loop = LoopThread()
    try:
        stage = RemoteStage(peer_id=None, start=0, end=2, node_id="node0")
        chain = RemoteChain(p2p=_FlakyPeer(), loop=loop, stages=[stage], job_id="job", timeout_s=10,
                            direct_channels=False)  # hivemind P2P's lost attempt
        hidden = torch.zeros(1, 3, 4)
        result, outputs = chain.call(stage, FORWARD, chain.transport.meta(stage), [hidden, torch.ones(1, 3), torch.ones(1, 3)])
        assert result.status == CallResult.OK and torch.equal(outputs[0], torch.ones(2, 3))
    finally:
        loop.shutdown()
    forward, retried = stage.stream_bytes["forward"], stage.stream_bytes["retried"]
    assert forward.sent == retried.sent > hidden.numel() * 4  # the same request, sent twice
    assert forward.received > 0 and retried.received == 0
    assert stage.bytes_sent == forward.sent + retried.sent


@pytest.mark.parametrize("input_grad", [True, False])
def test_only_the_first_range_is_told_when_the_trainer_has_no_use_for_its_input_gradient(input_grad):
    stages = [RemoteStage(peer_id=None, start=start, end=start + 2, node_id=f"node{start}") for start in (0, 2, 4)]
    chain = RemoteChain(p2p=None, loop=None, stages=stages, job_id="job", timeout_s=10)
    told = []

    def call(stage, method, meta, tensors=(), codecs=None):
        told.append((method.rsplit(".", 1)[-1], stage.start, meta.input_grad_unused))
        unused = method == BACKWARD and meta.input_grad_unused  # a node answers an empty tensor then
        return CallResult(status=CallResult.OK), [torch.empty(0) if unused else tensors[0]]

    chain.protocol.transport.call = call
    hidden, mask, positions = torch.zeros(1, 3, 4), torch.ones(1, 3), torch.arange(3).unsqueeze(0)
    route = chain.route()
    _, inputs = chain.forward(hidden, mask, positions, step=1, micro_batch=0, train=True, route=route,
                              input_grad=input_grad)
    chain.backward(torch.ones(1, 3, 4), inputs, mask, positions, step=1, micro_batch=0, route=route)
    unused = not input_grad
    assert told == [("forward", 0, unused), ("forward", 2, False), ("forward", 4, False),
                    ("backward", 4, False), ("backward", 2, False), ("backward", 0, unused)]
    told.clear()
    chain.forward(hidden, mask, positions, step=1, micro_batch=0, train=False, input_grad=input_grad)
    assert [flag for _, _, flag in told] == [False] * 3  # generation keeps no graph at all: nothing to tell


@pytest.mark.parametrize("method", [FORWARD, BACKWARD])
def test_a_replica_answering_hidden_states_of_the_wrong_shape_leaves_the_chain_and_another_serves(method):
    liar = RemoteStage(peer_id=None, start=0, end=2, node_id="liar")
    honest = RemoteStage(peer_id=None, start=0, end=2, node_id="honest")
    last = RemoteStage(peer_id=None, start=2, end=4, node_id="last")
    chain = RemoteChain(p2p=None, loop=None, stages=[liar, honest, last], job_id="job", timeout_s=10)
    drops = []
    chain.replica_groups.drop_listeners.append(lambda stage, reason: drops.append((stage.node_id, reason)))

    def call(stage, called, meta, tensors=(), codecs=None):
        if stage is liar and called == method:
            return CallResult(status=CallResult.OK), [torch.zeros(1, 1, 1, dtype=torch.long)]
        return CallResult(status=CallResult.OK), [tensors[0] + 1]

    chain.protocol.transport.call = call
    hidden, mask, positions = torch.zeros(2, 3, 4), torch.ones(2, 3), torch.arange(3).expand(2, 3)
    route = [liar, last]
    output, inputs = chain.forward(hidden, mask, positions, step=1, micro_batch=0, train=True, route=route)
    grad = chain.backward(torch.ones(2, 3, 4), inputs, mask, positions, step=1, micro_batch=0, route=route)
    assert torch.equal(output, hidden + 2) and torch.equal(grad, torch.full((2, 3, 4), 3.0))
    assert route[0] is honest and liar not in chain.replica_groups.groups[0]
    assert drops == [("liar", f"node liar (blocks 0..1) answered {method.rsplit('.', 1)[-1]} with a torch.int64 "
                               "tensor of shape [1, 1, 1], not a floating-point one of shape [2, 3, 4]")]


def test_nan_hidden_states_refused_by_a_range_are_laid_at_the_range_that_answered_them():
    first, second = (RemoteStage(peer_id=None, start=start, end=start + 2, node_id=f"node{start}") for start in (0, 2))
    chain = RemoteChain(p2p=None, loop=None, stages=[first, second], job_id="job", timeout_s=10)

    def call(stage, method, meta, tensors=(), codecs=None):
        if stage is second:  # as a node refuses them (node.input_checks)
            raise RemoteBlockError(f"{stage} refused {method}: ValueError: hidden states contain NaN or inf")
        return CallResult(status=CallResult.OK), [torch.full_like(tensors[0], float("nan"))]

    chain.protocol.transport.call = call
    with pytest.raises(RemoteBlockError, match=r"node node0 \(blocks 0..1\) answered forward with hidden states that "
                                               r"contain NaN or inf, which node node2 \(blocks 2..3\) refused"):
        chain.forward(torch.zeros(1, 3, 4), torch.ones(1, 3), torch.arange(3).unsqueeze(0), step=1, micro_batch=0,
                      train=False)
