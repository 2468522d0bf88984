"""The node's side of the gRPC control plane: one TLS-encrypted bidirectional stream to the coordinator.

The coordinator is authenticated twice before the node sends anything but its hello: its TLS certificate
must be bound to the trusted key (swarm/control_tls.py), and its challenge must carry that key's signature
over the node's fresh nonce.

Outgoing messages go through a queue the stream drains; incoming ones are read on a thread into a queue, so
the main thread waits with timeouts and stays responsive to Ctrl-C. Every heartbeat carries the process's
peak memory so far, and a `memory_query` is answered from the reader thread at once, so the coordinator can
read each node's peak when training ends without waiting for the next periodic beat.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import sys
import threading

import grpc
import torch

from node.coordinator_trust import CoordinatorTrust
from swarm.control_tls import TLS_SERVER_NAME, certificate_identity, fetch_certificate
from swarm.errors import CoordinatorTrustError, SwarmConnectionError, SwarmError
from swarm.identity import Identity, coordinator_proof_message, fingerprint, join_challenge_message, verify
from swarm.memory import rss_bytes
from swarm.proto import control_pb2 as pb
from swarm.proto.control_pb2_grpc import CoordinatorStub

_CLOSED = object()
logger = logging.getLogger("swarm.node")


def peak_memory() -> tuple[int, int]:
    """(peak resident set in bytes, peak CUDA memory allocated by torch in bytes or 0 without CUDA).

    ru_maxrss is the high-water mark the kernel keeps for the process: no sampling can miss a short peak.
    Linux reports it in KiB, macOS in bytes.
    """
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peak_device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    return peak_rss, peak_device


class ControlSession:
    """A session with the coordinator `trust` names; the constructor refuses one whose certificate is not
    bound to the trusted key (CoordinatorTrustError), before a single gRPC message."""

    def __init__(self, trust: CoordinatorTrust, connect_timeout: float):
        self.address = address = trust.address
        self.trust = trust
        certificate = fetch_certificate(address, connect_timeout)
        self.coordinator_key = certificate_identity(certificate, address)
        trust.check(self.coordinator_key)
        # That certificate as the only root: the handshake fails unless the server holds its TLS key.
        self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=certificate),
                                           options=[("grpc.max_receive_message_length", 64 << 20),
                                                    ("grpc.ssl_target_name_override", TLS_SERVER_NAME)])
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise SwarmConnectionError(
                f"no TLS session with the coordinator at {address} within {connect_timeout:.0f} s, though it "
                "presented a trusted certificate: it stopped, or another server now answers there") from None
        self._outgoing: queue.Queue = queue.Queue()
        self._incoming: queue.Queue = queue.Queue()
        self._responses = CoordinatorStub(self.channel).Join(iter(self._outgoing.get, _CLOSED))
        self._reader = threading.Thread(target=self._read, name="control-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._responses:
                if message.WhichOneof("kind") == "memory_query":
                    query_id = message.memory_query.query_id
                    self.send(heartbeat=pb.Heartbeat(rss_bytes=rss_bytes(), state="alive", query_id=query_id))
                    continue
                self._incoming.put(message)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self._incoming.put(SwarmConnectionError(f"lost the coordinator at {self.address}: {error.details()}"))
        self._incoming.put(_CLOSED)

    def send(self, **kind) -> None:
        message = pb.NodeMessage(**kind)
        if message.WhichOneof("kind") == "heartbeat":
            message.heartbeat.peak_rss_bytes, message.heartbeat.peak_device_bytes = peak_memory()
        self._outgoing.put(message)

    def receive(self, timeout: float | None = None) -> pb.CoordinatorMessage | None:
        """The next coordinator message; None on timeout; raises when the stream ended."""
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self._incoming.put(_CLOSED)
            raise SwarmConnectionError(f"the coordinator at {self.address} closed the session")
        if isinstance(item, Exception):
            raise item
        if item.WhichOneof("kind") == "reject":
            raise SwarmError(f"the coordinator refused this node: {item.reject.reason}")
        return item

    def expect(self, kind: str, timeout: float) -> pb.CoordinatorMessage:
        message = self.receive(timeout)
        if message is None:
            raise SwarmConnectionError(f"no {kind} from the coordinator within {timeout:.0f} s")
        if message.WhichOneof("kind") != kind:
            raise SwarmError(f"protocol error: expected {kind}, got {message.WhichOneof('kind')}")
        return message

    def authenticate(self, identity: Identity, hello: pb.NodeHello, timeout: float) -> pb.Welcome:
        """hello -> challenge (the coordinator proves its key) -> signed proof -> welcome."""
        hello.nonce = os.urandom(32)
        self.send(hello=hello)
        challenge = self.expect("challenge", timeout).challenge
        self.check_challenge(challenge, hello)
        message = join_challenge_message(challenge.nonce, challenge.coordinator_public_key)
        self.send(proof=pb.JoinProof(signature=identity.sign(message)))
        return self.expect("welcome", timeout).welcome

    def check_challenge(self, challenge: pb.Challenge, hello: pb.NodeHello) -> None:
        """The challenge must come from the key the TLS certificate is bound to, signed over our nonce."""
        claimed, expected = challenge.coordinator_public_key, self.coordinator_key
        self.trust.check(claimed)
        if claimed != expected:
            raise CoordinatorTrustError(
                f"the coordinator at {self.address} presented key {fingerprint(claimed)} in its challenge but "
                f"{fingerprint(expected)} in its TLS certificate: refusing to join")
        if not verify(claimed, challenge.signature, coordinator_proof_message(hello.nonce, hello.public_key)):
            raise CoordinatorTrustError(
                f"the coordinator at {self.address} presented key {fingerprint(claimed)} (trusted: "
                f"{self.trust.pin or fingerprint(expected)}) but did not sign this node's nonce with it: "
                "refusing to join")
        if self.trust.remember(claimed):
            logger.info("trusting coordinator key %s at %s from now on (kept in %s)", fingerprint(claimed),
                        self.address, self.trust.known_file)

    def close(self, drain_timeout: float = 3.0) -> None:
        """End the stream after the queued messages went out, then close the channel."""
        self._outgoing.put(_CLOSED)
        self._reader.join(timeout=drain_timeout)
        self.channel.close()
