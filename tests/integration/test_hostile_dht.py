"""A stranger's oversized request to a real DHT (as every node and coordinator runs one): hivemind's DHT RPCs are
unary, and the receiving p2p daemon refuses a unary message over its persistent connection's limit (hivemind's
4 MiB default, which no swarm process changes) before the DHT process sees any of it. The stranger raises its own
daemon's limit to send it, as a hostile peer would. Our framing bounds the data plane's streams
(swarm.p2p.framing); this guards the bound the DHT relies on, in case a hivemind upgrade moves it."""

from __future__ import annotations

import asyncio

import psutil
from hivemind import DHT
from hivemind.dht.protocol import DHTProtocol
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
from hivemind.proto import dht_pb2

from swarm.p2p.dht_process import start_dht

PING = f"{DHTProtocol.__name__}.rpc_ping"
REFUSED_WITHIN_S = 5.0


def daemon_rss(dht_pid: int) -> int:
    """Resident bytes of the p2p daemon the DHT process started."""
    daemons = [p for p in psutil.Process(dht_pid).children(recursive=True) if "p2pd" in p.name()]
    assert len(daemons) == 1, daemons
    return daemons[0].memory_info().rss


def test_a_unary_request_over_the_daemons_limit_never_reaches_the_dht_and_is_not_held():
    assert DEFAULT_MAX_MSG_SIZE == 4 << 20  # the bound this test is about
    dht = DHT(start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    start_dht(dht)
    try:
        before = daemon_rss(dht.pid)

        async def stranger_calls() -> list[str]:
            stranger = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                        initial_peers=[str(addr) for addr in dht.get_visible_maddrs()],
                                        persistent_conn_max_msg_size=1 << 30)
            outcomes = []
            try:
                for size in (64 << 20, 5 << 20, 1 << 10):  # two over the limit, then a well-formed ping
                    request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=bytes(size)))
                    try:
                        await asyncio.wait_for(stranger.call_protobuf_handler(dht.peer_id, PING, request,
                                                                              dht_pb2.PingResponse),
                                               REFUSED_WITHIN_S)
                        outcomes.append("answered")
                    except Exception as error:  # the refusal reaches the caller as a timeout or a reset
                        outcomes.append(f"refused ({type(error).__name__})")
            finally:
                await stranger.shutdown()
            return outcomes

        outcomes = asyncio.run(stranger_calls())
        assert [outcome.startswith("refused") for outcome in outcomes] == [True, True, False], outcomes
        grown = daemon_rss(dht.pid) - before
        assert grown < 32 << 20, f"the DHT's daemon grew {grown >> 20} MiB: it held the oversized request"
    finally:
        dht.shutdown()
