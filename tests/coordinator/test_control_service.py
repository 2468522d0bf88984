"""The real gRPC control service on 127.0.0.1: a join whose challenge is signed by another key than the
hello's, or a hello without a proper key, is refused by name, and the service keeps admitting good nodes."""

from __future__ import annotations

import pytest

from coordinator.control_service import ControlService, JobStatus, start_control_server
from coordinator.membership import Membership
from node.control_client import ControlSession
from swarm.errors import SwarmError
from swarm.identity import Identity, join_challenge_message
from swarm.proto import control_pb2 as pb


@pytest.fixture
def service():
    membership = Membership()
    service = ControlService(Identity.generate(), membership, JobStatus("job-1", num_blocks=4, total_steps=1),
                             ["/ip4/127.0.0.1/tcp/1/p2p/QmTrainer"], heartbeat_interval_s=1.0)
    server, port = start_control_server(service, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}", membership
    server.stop(grace=0)


def hello(identity: Identity) -> pb.NodeHello:
    return pb.NodeHello(public_key=identity.public_key, device="cpu", version="test", hostname="test")


def test_a_challenge_signed_by_another_key_is_refused_and_a_good_node_then_joins(service):
    address, membership = service
    claimed, signer = Identity.generate(), Identity.generate()
    session = ControlSession(address, connect_timeout=10)
    try:
        session.send(hello=hello(claimed))
        challenge = session.expect("challenge", 10).challenge
        forged = signer.sign(join_challenge_message(challenge.nonce, challenge.coordinator_public_key))
        session.send(proof=pb.JoinProof(signature=forged))
        with pytest.raises(SwarmError, match="refused this node: the join challenge was not signed by the hello's key"):
            session.expect("welcome", 10)
    finally:
        session.close()
    assert membership.nodes() == []  # nobody was admitted
    honest = ControlSession(address, connect_timeout=10)
    try:
        welcome = honest.authenticate(signer, hello(signer), 10)
        assert welcome.node_id == signer.fingerprint and welcome.job_id == "job-1"
        assert [record.node_id for record in membership.nodes()] == [signer.fingerprint]
    finally:
        honest.close()


def test_a_hello_without_a_32_byte_key_is_refused(service):
    address, _ = service
    session = ControlSession(address, connect_timeout=10)
    try:
        session.send(hello=pb.NodeHello(public_key=b"short", device="cpu"))
        with pytest.raises(SwarmError, match="refused this node: a session must start with a hello carrying a 32-byte"):
            session.expect("challenge", 10)
    finally:
        session.close()
