"""The real gRPC control service on 127.0.0.1, over TLS: both sides must prove their keys. A join whose challenge
is signed by another key than the hello's, or a hello without a proper key or nonce, is refused by name and the
service keeps admitting good nodes; a node refuses a coordinator whose certificate, challenge key or signature
does not match the key it trusts, and a plaintext client gets no service."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from coordinator.control_service import ControlService, JobStatus, start_control_server
from coordinator.membership import Membership
from node.control_client import ControlSession
from node.coordinator_trust import CoordinatorTrust
from swarm.control_tls import coordinator_certificate
from swarm.errors import CoordinatorTrustError, SwarmError
from swarm.identity import Identity, join_challenge_message
from swarm.node_state import NodeState
from swarm.proto import control_pb2 as pb
from swarm.proto.control_pb2_grpc import CoordinatorStub


class ForgingService(ControlService):
    """A coordinator that presents a key it cannot sign with (its challenge signature is another key's)."""

    def prove_identity(self, node_nonce: bytes, node_public_key: bytes) -> bytes:
        return Identity.generate().sign(b"anything")


@contextlib.contextmanager
def serving(identity: Identity, certified: Identity | None = None, service_class=ControlService, port: int = 0):
    """A control server whose service speaks for `identity` and whose TLS certificate `certified` vouches for
    (`identity` unless given)."""
    membership = Membership()
    service = service_class(identity, membership, JobStatus("job-1", num_blocks=4, total_steps=1),
                            ["/ip4/127.0.0.1/tcp/1/p2p/QmTrainer"], heartbeat_interval_s=1.0)
    server, port = start_control_server(service, "127.0.0.1", port, coordinator_certificate(certified or identity))
    try:
        yield f"127.0.0.1:{port}", membership
    finally:
        server.stop(grace=0)


@pytest.fixture
def coordinator():
    identity = Identity.generate()
    with serving(identity) as (address, membership):
        yield identity, address, membership


def pinned(address: str, identity: Identity) -> CoordinatorTrust:
    return CoordinatorTrust(address, pin=identity.fingerprint)


def hello(identity: Identity) -> pb.NodeHello:
    return pb.NodeHello(public_key=identity.public_key, device="cpu", version="test", hostname="test")


def test_a_node_pinned_to_the_coordinators_key_joins(coordinator):
    identity, address, membership = coordinator
    node = Identity.generate()
    session = ControlSession(pinned(address, identity), connect_timeout=10)
    try:
        welcome = session.authenticate(node, hello(node), 10)
        assert welcome.node_id == node.fingerprint and welcome.job_id == "job-1"
        assert [record.node_id for record in membership.nodes()] == [node.fingerprint]
    finally:
        session.close()


def test_a_challenge_signed_by_another_key_is_refused_and_a_good_node_then_joins(coordinator):
    identity, address, membership = coordinator
    claimed, signer = Identity.generate(), Identity.generate()
    session = ControlSession(pinned(address, identity), connect_timeout=10)
    try:
        session.send(hello=pb.NodeHello(public_key=claimed.public_key, nonce=bytes(32)))
        challenge = session.expect("challenge", 10).challenge
        forged = signer.sign(join_challenge_message(challenge.nonce, challenge.coordinator_public_key))
        session.send(proof=pb.JoinProof(signature=forged))
        with pytest.raises(SwarmError, match="refused this node: the join challenge was not signed by the hello's key"):
            session.expect("welcome", 10)
    finally:
        session.close()
    assert membership.nodes() == []  # nobody was admitted
    honest = ControlSession(pinned(address, identity), connect_timeout=10)
    try:
        welcome = honest.authenticate(signer, hello(signer), 10)
        assert welcome.node_id == signer.fingerprint
        assert [record.node_id for record in membership.nodes()] == [signer.fingerprint]
    finally:
        honest.close()


@pytest.mark.parametrize("fields", [{"public_key": b"short", "nonce": bytes(32)},
                                    {"public_key": bytes(32)}], ids=["short key", "no nonce"])
def test_a_hello_without_a_32_byte_key_and_nonce_is_refused(coordinator, fields):
    identity, address, _ = coordinator
    session = ControlSession(pinned(address, identity), connect_timeout=10)
    try:
        session.send(hello=pb.NodeHello(device="cpu", **fields))
        with pytest.raises(SwarmError, match="refused this node: a session must start with a hello carrying a 32-byte"):
            session.expect("challenge", 10)
    finally:
        session.close()


def test_a_coordinator_with_another_key_is_refused_before_any_message(coordinator):
    identity, address, membership = coordinator
    expected = Identity.generate()
    with pytest.raises(CoordinatorTrustError, match=f"presented key {identity.fingerprint}, but this node was told "
                                                    f"to trust key {expected.fingerprint}"):
        ControlSession(pinned(address, expected), connect_timeout=10)
    assert membership.nodes() == []


def test_a_certificate_bound_to_another_key_than_the_challenges_is_refused():
    coordinator, certified = Identity.generate(), Identity.generate()
    with serving(coordinator, certified) as (address, membership):
        session = ControlSession(pinned(address, certified), connect_timeout=10)
        node = Identity.generate()
        try:
            with pytest.raises(CoordinatorTrustError, match=f"presented key {coordinator.fingerprint}, but this node "
                                                            f"was told to trust key {certified.fingerprint}"):
                session.authenticate(node, hello(node), 10)
        finally:
            session.close()
        assert membership.nodes() == []


def test_a_coordinator_that_cannot_sign_the_nodes_nonce_is_refused():
    identity = Identity.generate()
    with serving(identity, service_class=ForgingService) as (address, membership):
        session = ControlSession(pinned(address, identity), connect_timeout=10)
        node = Identity.generate()
        try:
            with pytest.raises(CoordinatorTrustError, match=f"presented key {identity.fingerprint} .* did not sign "
                                                            "this node's nonce"):
                session.authenticate(node, hello(node), 10)
        finally:
            session.close()
        assert membership.nodes() == []


def test_a_plaintext_client_gets_no_service(coordinator):
    _, address, membership = coordinator
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as status_error:
            CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=5)
        assert status_error.value.code() == grpc.StatusCode.UNAVAILABLE
        stream = CoordinatorStub(channel).Join(iter([pb.NodeMessage(hello=pb.NodeHello(public_key=bytes(32),
                                                                                       nonce=bytes(32)))]), timeout=5)
        with pytest.raises(grpc.RpcError) as join_error:
            next(stream)
        assert join_error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert membership.nodes() == []


def test_trust_on_first_use_remembers_the_key_and_refuses_another_at_that_address(tmp_path):
    first, second, node = Identity.generate(), Identity.generate(), Identity.generate()
    known = tmp_path / "known_coordinators"
    with serving(first) as (address, _):
        session = ControlSession(CoordinatorTrust(address, known_file=known), connect_timeout=10)
        try:
            session.authenticate(node, hello(node), 10)
        finally:
            session.close()
    assert f"{address} {first.public_key.hex()}" in known.read_text().splitlines()
    with serving(second, port=int(address.rsplit(":", 1)[1])) as (same_address, membership):
        assert same_address == address
        with pytest.raises(CoordinatorTrustError, match=f"presented key {second.fingerprint}, but {known} remembers "
                                                        f"key {first.fingerprint} for it"):
            ControlSession(CoordinatorTrust(address, known_file=known), connect_timeout=10)
        assert membership.nodes() == []
    assert known.read_text().count(address) == 1


def test_a_message_out_of_turn_is_ignored_and_the_session_still_ends_with_its_stream(coordinator):
    """`ready` from a node never assigned a range is a move its record does not allow: it used to end the
    session's reader thread, leaving the node `joined` and a server thread waiting on it forever."""
    identity, address, membership = coordinator
    node = Identity.generate()
    session = ControlSession(pinned(address, identity), connect_timeout=10)
    try:
        session.authenticate(node, hello(node), 10)
        session.send(ready=pb.NodeReady(peer_id="12D3KooWUnassigned"))
        session.send(heartbeat=pb.Heartbeat(rss_bytes=1))
        assert membership.wait_until(lambda m: m.nodes()[0].memory is not None, 10)  # still read after it
        assert membership.state_of(node.fingerprint) == NodeState.JOINED
    finally:
        session.close()
    assert membership.wait_until(lambda m: m.state_of(node.fingerprint) == NodeState.DOWN, 10)
