"""Block announcements in the DHT: `(model id, block index) -> peer, range, state`, with expirations.

Nodes re-announce before their records expire; a trainer finds a chain of peers covering every block without
asking the coordinator for each step (as Petals does), and a node that vanishes drops out when its records
expire.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time


@dataclass(frozen=True)
class BlockServerInfo:
    peer_id: PeerID
    start: int
    end: int
    state: str
    node_id: str


def block_key(model_id: str, index: int) -> str:
    return f"{model_id}.block.{index}"


def announce_blocks(dht: DHT, model_id: str, start: int, end: int, node_id: str, state: str, ttl: float) -> bool:
    peer = dht.peer_id.to_base58()
    value = {"start": start, "end": end, "state": state, "node_id": node_id}
    expiration = get_dht_time() + ttl
    futures = [
        dht.store(block_key(model_id, index), value, expiration, subkey=peer, return_future=True)
        for index in range(start, end)
    ]
    return all(future.result() for future in futures)


def find_block_servers(dht: DHT, model_id: str, num_blocks: int) -> dict[int, list[BlockServerInfo]]:
    futures = {index: dht.get(block_key(model_id, index), latest=True, return_future=True) for index in range(num_blocks)}
    servers: dict[int, list[BlockServerInfo]] = {}
    for index, future in futures.items():
        found = future.result()
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        servers[index] = [
            BlockServerInfo(PeerID.from_base58(peer), info.value["start"], info.value["end"], info.value["state"],
                            info.value["node_id"])
            for peer, info in sorted(entries.items())
            if isinstance(info.value, dict) and info.value.get("state") == "online"
        ]
    return servers


def find_replicas(dht: DHT, model_id: str, num_blocks: int) -> list[BlockServerInfo]:
    """Every online peer serving a range of the model, once each (a range has one entry per block)."""
    servers = find_block_servers(dht, model_id, num_blocks)
    unique = {(s.peer_id, s.start, s.end): s for index in sorted(servers) for s in servers[index]}
    return sorted(unique.values(), key=lambda s: (s.start, s.end, s.node_id))
