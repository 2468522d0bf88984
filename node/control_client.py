"""The node's side of the gRPC control plane: one bidirectional stream to the coordinator.

Outgoing messages go through a queue the stream drains; incoming ones are read on a thread into a queue, so
the main thread waits with timeouts and stays responsive to Ctrl-C.
"""

from __future__ import annotations

import queue
import threading

import grpc

from swarm.errors import SwarmConnectionError, SwarmError
from swarm.identity import Identity, join_challenge_message
from swarm.proto import control_pb2 as pb
from swarm.proto.control_pb2_grpc import CoordinatorStub

_CLOSED = object()


class ControlSession:
    def __init__(self, address: str, connect_timeout: float):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise SwarmConnectionError(
                f"cannot reach a coordinator at {address} within {connect_timeout:.0f} s; check the address "
                "that `swarm-coordinator run` printed and that it is still running"
            ) from None
        self._outgoing: queue.Queue = queue.Queue()
        self._incoming: queue.Queue = queue.Queue()
        self._responses = CoordinatorStub(self.channel).Join(iter(self._outgoing.get, _CLOSED))
        self._reader = threading.Thread(target=self._read, name="control-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._responses:
                self._incoming.put(message)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self._incoming.put(SwarmConnectionError(f"lost the coordinator at {self.address}: {error.details()}"))
        self._incoming.put(_CLOSED)

    def send(self, **kind) -> None:
        self._outgoing.put(pb.NodeMessage(**kind))

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
        """hello -> challenge -> signed proof -> welcome."""
        self.send(hello=hello)
        challenge = self.expect("challenge", timeout).challenge
        message = join_challenge_message(challenge.nonce, challenge.coordinator_public_key)
        self.send(proof=pb.JoinProof(signature=identity.sign(message)))
        return self.expect("welcome", timeout).welcome

    def close(self, drain_timeout: float = 3.0) -> None:
        """End the stream after the queued messages went out, then close the channel."""
        self._outgoing.put(_CLOSED)
        self._reader.join(timeout=drain_timeout)
        self.channel.close()
