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


def find_chain(dht: DHT, model_id: str, num_blocks: int) -> list[BlockServerInfo] | None:
    """Peers whose ranges cover blocks 0..num_blocks-1 end to end, or None while some block is uncovered."""
    servers = find_block_servers(dht, model_id, num_blocks)
    chain, position = [], 0
    while position < num_blocks:
        starting_here = [s for s in servers[position] if s.start == position]
        if not starting_here:
            return None
        chosen = starting_here[0]
        chain.append(chosen)
        position = chosen.end
    return chain
