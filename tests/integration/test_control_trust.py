"""Real `swarm-node join` processes authenticate the coordinator before they obey it: a pinned node joins its
coordinator and refuses an impostor at the same address or a certificate bound to another key; a node trusting
on first use remembers the key and refuses a changed one; with neither, the join is refused up front; a real
`swarm-coordinator run` serves no plaintext client. Each refusal is one line naming both fingerprints, exit 2."""

from __future__ import annotations

import contextlib
import re
import signal

import grpc
import pytest
from hivemind import DHT

from coordinator.control_service import ControlService, JobStatus, end_sessions, start_control_server
from coordinator.membership import Membership
from swarm.control_tls import coordinator_certificate
from swarm.identity import Identity
from swarm.p2p.dht_process import start_dht
from swarm.proto import control_pb2 as pb
from swarm.proto.control_pb2_grpc import CoordinatorStub
from tests.conftest import write_job
from tests.integration.helpers import finish, join_flags, read_until


@pytest.fixture(scope="module")
def dht_peers():
    """A DHT for welcomed nodes to bootstrap from (a node joins it before waiting for an assignment)."""
    dht = DHT(start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    start_dht(dht)  # this worker may have used gRPC already
    yield [str(address) for address in dht.get_visible_maddrs()]
    dht.shutdown()


@contextlib.contextmanager
def coordinator_at(identity: Identity, peers: list[str], port: int = 0, certified: Identity | None = None):
    """A real control server speaking for `identity`, its TLS certificate bound to `certified` (default the
    same key); yields (address, membership) and tells every node the job ended on exit."""
    membership = Membership()
    service = ControlService(identity, membership, JobStatus("trust-job", num_blocks=4, total_steps=1), peers,
                             heartbeat_interval_s=1.0)
    server, bound = start_control_server(service, "127.0.0.1", port, coordinator_certificate(certified or identity))
    try:
        yield f"127.0.0.1:{bound}", membership
    finally:
        end_sessions(membership, "test over")
        server.stop(grace=1).wait()


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def join(processes, tmp_path, *flags: str):
    return processes("-m", "node.cli", "join", *flags, "--key", str(tmp_path / "keys" / "node.key"), "--threads", "1")


def joins_and_leaves(node, membership: Membership) -> None:
    """The node got as far as waiting for an assignment; told the job ended, it exits cleanly."""
    read_until(node, r"waiting for an assignment", timeout=120)
    assert len(membership.nodes()) == 1
    end_sessions(membership, "test over")
    code, output = finish(node, timeout=60)
    assert code == 0, output
    assert "the job ended before this node was needed" in output


def refused(node) -> str:
    """The node's one error line, after checking it exited with status 2 and no traceback."""
    code, output = finish(node, timeout=120)
    assert code == 2, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("swarm-node: error:")]
    return line


def test_a_node_pinned_with_fingerprint_at_address_joins_its_coordinator(tmp_path, processes, dht_peers):
    identity = Identity.generate()
    with coordinator_at(identity, dht_peers) as (address, membership):
        node = join(processes, tmp_path, "--coordinator", f"{identity.fingerprint}@{address}")
        joins_and_leaves(node, membership)
    assert not (tmp_path / "keys" / "known_coordinators").exists()  # a pinned node remembers nothing


def test_an_impostor_at_the_pinned_address_is_refused(tmp_path, processes, dht_peers):
    genuine, impostor = Identity.generate(), Identity.generate()
    with coordinator_at(genuine, dht_peers) as (address, _):
        pass
    with coordinator_at(impostor, dht_peers, port=port_of(address)) as (same_address, membership):
        assert same_address == address
        node = join(processes, tmp_path, "--coordinator", address, "--coordinator-key", genuine.pin)
        line = refused(node)
        assert membership.nodes() == []
    assert f"presented key {impostor.fingerprint}" in line and f"trust key {genuine.fingerprint}" in line, line


def test_a_tls_certificate_bound_to_another_key_than_the_pin_is_refused(tmp_path, processes, dht_peers):
    pinned, certified = Identity.generate(), Identity.generate()
    with coordinator_at(pinned, dht_peers, certified=certified) as (address, membership):
        node = join(processes, tmp_path, "--coordinator", address, "--coordinator-key", pinned.fingerprint)
        line = refused(node)
        assert membership.nodes() == []
    assert f"presented key {certified.fingerprint}" in line and f"trust key {pinned.fingerprint}" in line, line


def test_trust_on_first_use_remembers_the_key_and_refuses_a_changed_one(tmp_path, processes, dht_peers):
    first, second = Identity.generate(), Identity.generate()
    known = tmp_path / "keys" / "known_coordinators"
    with coordinator_at(first, dht_peers) as (address, membership):
        joins_and_leaves(join(processes, tmp_path, "--coordinator", address, "--trust-on-first-use"), membership)
    assert f"{address} {first.public_key.hex()}" in known.read_text().splitlines()
    with coordinator_at(second, dht_peers, port=port_of(address)) as (_, membership):
        line = refused(join(processes, tmp_path, "--coordinator", address, "--trust-on-first-use"))
        assert membership.nodes() == []
    assert f"presented key {second.fingerprint}, but {known} remembers key {first.fingerprint}" in line, line
    assert f"delete the line for {address} from {known}" in line


def test_a_join_with_neither_a_pin_nor_trust_on_first_use_is_refused_saying_where_the_fingerprint_is(
        tmp_path, processes):
    line = refused(join(processes, tmp_path, "--coordinator", "127.0.0.1:9"))
    assert "names no coordinator key to trust" in line
    assert "--coordinator-key FINGERPRINT" in line and "'join with:' line" in line and "--trust-on-first-use" in line


def test_a_real_coordinator_serves_no_plaintext_client_and_a_wrongly_pinned_node_is_refused(tmp_path, processes):
    job_file = write_job(tmp_path, swarm={"min_nodes": 1, "join_timeout_s": 300})
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--run-dir", str(tmp_path / "run"),
                            "--no-progress", "--no-baseline")
    flags = join_flags(coordinator)
    address, fingerprint = flags[1], flags[3]
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    other = Identity.generate().fingerprint
    line = refused(join(processes, tmp_path, "--coordinator", address, "--coordinator-key", other))
    assert f"presented key {fingerprint[:16]}" in line and f"trust key {other}" in line, line
    coordinator.send_signal(signal.SIGINT)
    code, output = finish(coordinator, timeout=60)
    assert code == 130, output
    assert not re.search(r"node [0-9a-f]{16} joined", output)
