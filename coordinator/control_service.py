"""The coordinator's gRPC service: node sessions (a join that authenticates both ways, heartbeats) and status
queries, served over TLS only, with a certificate bound to the coordinator's key (swarm/control_tls.py)."""

from __future__ import annotations

import collections
import logging
import itertools
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from coordinator.membership import Membership, NodeRecord
from swarm.control_tls import CoordinatorCertificate, coordinator_certificate
from swarm.identity import Identity, coordinator_proof_message, fingerprint, join_challenge_message, verify
from swarm.node_state import NodeState, NodeStateError
from swarm.proto import control_pb2 as pb
from swarm.proto import control_pb2_grpc

logger = logging.getLogger("swarm.coordinator")

_END = object()
HANDSHAKE_TIMEOUT_S = 30.0  # a joining node sends its hello and its proof within this, or its join is cancelled
MAX_HANDSHAKES_PER_ADDRESS = 16
_MEMORY_QUERY_IDS = itertools.count(1)


@dataclass
class JobStatus:
    """What status queries report; the trainer updates it."""

    job_id: str
    num_blocks: int
    total_steps: int
    phase: str = "waiting for nodes"
    step: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ControlService(control_pb2_grpc.CoordinatorServicer):
    def __init__(self, identity: Identity, membership: Membership, status: JobStatus, initial_peers: list[str],
                 heartbeat_interval_s: float, allowed: set[str] | None = None):
        self.identity = identity
        self.membership = membership
        self.status = status
        self.initial_peers = initial_peers
        self.heartbeat_interval_s = heartbeat_interval_s
        self.allowed = allowed
        self._handshakes: collections.Counter[str] = collections.Counter()  # joins in progress, by address
        self._handshakes_lock = threading.Lock()

    def Join(self, request_iterator, context):
        hello = yield from self._authenticate(request_iterator, context)
        if hello is None:
            return
        node_id = fingerprint(hello.public_key)
        if self.allowed is not None and node_id not in self.allowed:
            yield pb.CoordinatorMessage(reject=pb.Reject(reason=f"node {node_id} is not on this job's allowlist"))
            return
        record = NodeRecord(node_id=node_id, public_key=hello.public_key, hello=hello)
        if not self.membership.add(record):
            yield pb.CoordinatorMessage(reject=pb.Reject(reason=f"node {node_id} is already connected"))
            return
        logger.info("node %s joined (%s, %s)", node_id, hello.hostname, hello.device)
        yield pb.CoordinatorMessage(welcome=pb.Welcome(
            node_id=node_id, job_id=self.status.job_id, initial_peers=self.initial_peers,
            heartbeat_interval_s=self.heartbeat_interval_s,
        ))
        reader = threading.Thread(target=self._read_node, args=(record, request_iterator), daemon=True,
                                  name=f"session-{node_id}")
        reader.start()
        while True:
            outgoing = record.outbox.get()
            if outgoing is _END:
                return
            yield outgoing

    def _authenticate(self, request_iterator, context):
        """The join's handshake (hello, challenge, proof): yields the challenge or a rejection and returns
        the hello of a node that proved its key, else None.

        Every call holds one of the server's worker threads, so a caller that opens join streams and sends
        nothing must not hold them all (64 such streams stopped every join and status query): a handshake
        ends after HANDSHAKE_TIMEOUT_S, and one address has at most MAX_HANDSHAKES_PER_ADDRESS in progress."""
        address = context.peer().rpartition(":")[0]  # "ipv4:HOST:PORT" less the port
        with self._handshakes_lock:
            if self._handshakes[address] >= MAX_HANDSHAKES_PER_ADDRESS:
                yield pb.CoordinatorMessage(reject=pb.Reject(
                    reason=f"{MAX_HANDSHAKES_PER_ADDRESS} joins from {address} are in progress already; try again"))
                return None
            self._handshakes[address] += 1
        deadline = threading.Timer(HANDSHAKE_TIMEOUT_S, context.cancel)  # unblocks a read that never returns
        deadline.start()
        try:
            hello_message = next(request_iterator, None)
            if hello_message is None:
                return None
            hello = hello_message.hello
            if hello_message.WhichOneof("kind") != "hello" or len(hello.public_key) != 32 or len(hello.nonce) != 32:
                yield pb.CoordinatorMessage(reject=pb.Reject(
                    reason="a session must start with a hello carrying a 32-byte Ed25519 key and a 32-byte nonce "
                           "(a swarm-node older than this coordinator sends no nonce: update it)"))
                return None
            nonce = os.urandom(32)
            yield pb.CoordinatorMessage(challenge=pb.Challenge(
                nonce=nonce, coordinator_public_key=self.identity.public_key,
                signature=self.prove_identity(hello.nonce, hello.public_key)))
            proof = next(request_iterator, None)
            message = join_challenge_message(nonce, self.identity.public_key)
            if proof is None or proof.WhichOneof("kind") != "proof" \
                    or not verify(hello.public_key, proof.proof.signature, message):
                yield pb.CoordinatorMessage(reject=pb.Reject(reason="the join challenge was not signed by the hello's key"))
                return None
            return hello
        finally:
            deadline.cancel()
            with self._handshakes_lock:
                self._handshakes[address] -= 1
                if not self._handshakes[address]:
                    del self._handshakes[address]

    def prove_identity(self, node_nonce: bytes, node_public_key: bytes) -> bytes:
        """Our key's signature over the joining node's nonce: what its pin checks before it answers."""
        return self.identity.sign(coordinator_proof_message(node_nonce, node_public_key))

    def _read_node(self, record: NodeRecord, request_iterator) -> None:
        """Apply a node's session messages until its stream ends; then its session ends, whatever ended it.

        A message whose state move the node's record does not allow (`ready` before an assignment, `failure`
        after it left) is ignored with a warning: one such message used to end this thread without ending the
        session, leaving the record as it was and a server thread waiting forever."""
        try:
            for message in request_iterator:
                try:
                    self._apply(record, message)
                except NodeStateError as error:
                    logger.warning("node %s sent %s out of turn, ignored: %s", record.node_id,
                                   message.WhichOneof("kind"), error)
        except grpc.RpcError:
            pass
        finally:
            if not record.state.final:
                logger.warning("node %s disconnected", record.node_id)
                self.membership.update(record.node_id, state=NodeState.DOWN)
            record.outbox.put(_END)

    def _apply(self, record: NodeRecord, message: pb.NodeMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "heartbeat":
            self.membership.update(record.node_id, last_heartbeat=time.monotonic(), memory=message.heartbeat)
        elif kind == "ready":
            self.membership.update(record.node_id, state=NodeState.READY, ready=message.ready,
                                   last_heartbeat=time.monotonic())
            logger.info("node %s serves blocks %s", record.node_id, record.blocks)
        elif kind == "failure":
            logger.error("node %s failed: %s", record.node_id, message.failure.message)
            self.membership.update(record.node_id, state=NodeState.FAILED, failure=message.failure.message)
        elif kind == "leave" and message.leave.hand_off and record.state == NodeState.READY \
                and self.status.phase == "train":  # the trainer takes it out between two steps
            logger.info("node %s asks to leave at the next step: %s", record.node_id, message.leave.reason)
            self.membership.update(record.node_id, state=NodeState.LEAVING)
        elif kind == "leave" and message.leave.hand_off:  # nothing to hand over: it may go now
            logger.info("node %s left: %s", record.node_id, message.leave.reason)
            release_node(self.membership, record, "no step in progress; goodbye")
        elif kind == "leave":
            logger.info("node %s left: %s", record.node_id, message.leave.reason)
            self.membership.update(record.node_id, state=NodeState.LEFT)

    def Status(self, request, context):
        now = time.monotonic()
        reply = pb.StatusReply(job_id=self.status.job_id, phase=self.status.phase, step=self.status.step,
                               total_steps=self.status.total_steps, num_blocks=self.status.num_blocks)
        for record in self.membership.nodes():
            reply.nodes.append(pb.NodeStatus(
                node_id=record.node_id, device=record.hello.device, state=record.state,
                block_start=record.blocks.start if record.blocks else -1,
                block_end=record.blocks.end if record.blocks else -1,
                last_heartbeat_age_s=now - record.last_heartbeat,
                peer_id=record.ready.peer_id if record.ready else "",
            ))
        return reply


def start_control_server(service: ControlService, host: str, port: int,
                         certificate: CoordinatorCertificate | None = None) -> tuple[grpc.Server, int]:
    """Serve `service` on a TLS port only (a plaintext client gets no service), by default with a fresh
    certificate bound to the service's identity."""
    certificate = certificate or coordinator_certificate(service.identity)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    control_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    credentials = grpc.ssl_server_credentials([(certificate.key_pem, certificate.certificate_pem)])
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def query_peak_memory(membership: Membership, nodes: list[NodeRecord], timeout: float) -> list[str]:
    """Ask every connected node for a heartbeat now and wait for the answers; returns the ids that did not answer.

    A node's peak memory only grows, so an answer to a query sent after training ended holds the run's peak;
    a node that does not answer keeps the last periodic heartbeat it sent (its record says which it was).
    """
    query_id = next(_MEMORY_QUERY_IDS)
    connected = (NodeState.READY, NodeState.ASSIGNED, NodeState.JOINED)
    asked = [record for record in nodes if record.state in connected]
    for record in asked:
        record.send(memory_query=pb.MemoryQuery(query_id=query_id))

    def answered(_: Membership) -> bool:
        return all(r.memory is not None and r.memory.query_id == query_id or r.state not in connected for r in asked)

    membership.wait_until(answered, timeout)
    return [r.node_id for r in asked if r.memory is None or r.memory.query_id != query_id]


def release_node(membership: Membership, record: NodeRecord, reason: str) -> None:
    """Let a node that asked to leave go: it is out of the chain."""
    membership.update(record.node_id, state=NodeState.LEFT)
    record.send(finish=pb.Finish(reason=reason))
    record.outbox.put(_END)


def end_sessions(membership: Membership, reason: str) -> None:
    for record in membership.nodes():
        if not record.state.final:
            membership.update(record.node_id, state=NodeState.FINISHED)
        record.send(finish=pb.Finish(reason=reason))
        record.outbox.put(_END)
