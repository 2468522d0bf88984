"""Putting the chain together: waiting for nodes to join, placing block ranges on them (coordinator.scheduler),
sending each its range (the audit log records it first), waiting until they serve, and finding their
announcements in the DHT, as any trainer would. The session (coordinator.session) does this at the start and
again for each node that joins mid-job or takes over a lost range.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hivemind import DHT

from coordinator.chain import RemoteChain, RemoteStage
from coordinator.local_nodes import LocalNodes
from coordinator.membership import Membership, NodeRecord
from coordinator.scheduler import place_replicas
from swarm.audit.attestation import replica_group
from swarm.audit.log import AuditLog
from swarm.block_range import BlockRange
from swarm.config import Job
from swarm.errors import JoinTimeoutError, SwarmError
from swarm.models.checkpoint import DTYPES, Checkpoint, tensors_sha256
from swarm.node_state import GONE, NodeState
from swarm.p2p.announce import find_replicas
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.framing import BoundedP2P
from swarm.proto import control_pb2 as pb

logger = logging.getLogger("swarm.coordinator")

CHAIN_DISCOVERY_TIMEOUT_S = 60.0
LOCAL_NODE_START_TIMEOUT_S = 300.0  # a process of ours that has not joined by then is stuck, not slow


def _check_local_nodes(local: LocalNodes | None) -> None:
    if local is None:
        return
    for index, code in local.exited():
        raise SwarmError(f"local node {index} exited with code {code}; its log ends with:\n{local.log_tail(index)}")


def wait_for_nodes(membership: Membership, job: Job, local: LocalNodes | None, address: str,
                   coordinator_key: str = "") -> list[NodeRecord]:
    """Wait for `swarm.min_nodes` joined nodes. The join timeout is the time other volunteers get: its clock
    starts once the local nodes this coordinator started have joined (their start-up, seconds of imports on a
    cold cache, is not theirs to wait for); a local node that exits or never joins is an error of its own."""
    needed = job.swarm.min_nodes
    join = f"swarm-node join --coordinator {address}" + (f" --coordinator-key {coordinator_key}" if coordinator_key else "")
    if local is not None:
        _wait_for_joined(membership, min(local.count, needed), LOCAL_NODE_START_TIMEOUT_S, local, lambda joined: (
            f"the local nodes started with --local-nodes did not join within {LOCAL_NODE_START_TIMEOUT_S:.0f} s; "
            f"their logs are in {local.logs_dir}"))
    _wait_for_joined(membership, needed, job.swarm.join_timeout_s, local, lambda joined: (
        f"only {joined} of the {needed} nodes the job needs (swarm.min_nodes) joined within "
        f"{job.swarm.join_timeout_s:.0f} s (swarm.join_timeout_s); start more with: {join}"))
    return membership.nodes(NodeState.JOINED)


def _wait_for_joined(membership: Membership, count: int, timeout_s: float, local: LocalNodes | None,
                     message: Callable[[int], str]) -> None:
    """Until `count` nodes have joined; a local node that exits ends the wait at once, a timeout with
    JoinTimeoutError(message(nodes joined))."""
    deadline = time.monotonic() + timeout_s
    while not membership.wait_until(lambda m: len(m.nodes(NodeState.JOINED)) >= count, timeout=0.5):
        _check_local_nodes(local)
        if time.monotonic() > deadline:
            raise JoinTimeoutError(message(len(membership.nodes(NodeState.JOINED))))


def assign_blocks(nodes: list[NodeRecord], checkpoint: Checkpoint, job: Job, job_id: str, model_id: str,
                  audit: AuditLog, trainer_peer_id: str) -> None:
    """Send each node its range (coordinator.scheduler.place_replicas); the audit log gets the node's key
    (`join`) and its range before the node does. Nodes left without a range stay joined, as spares."""
    ranges = place_replicas(checkpoint.num_blocks, len(nodes), job.swarm.replicas, job.swarm.stages,
                            job.swarm.min_nodes)
    spares = [record for record, blocks in zip(nodes, ranges) if blocks is None]
    nodes[:] = [record for record, blocks in zip(nodes, ranges) if blocks is not None]
    if spares:
        logger.info("nodes %s stay on standby", ", ".join(record.node_id for record in spares))
    expected = {blocks: _expected_shard_sha256(checkpoint, job, blocks) for blocks in set(ranges) - {None}}
    for record, blocks in zip(nodes, [blocks for blocks in ranges if blocks is not None]):
        assign(record, blocks, checkpoint, job, job_id, model_id, audit, expected[blocks], trainer_peer_id)


def _expected_shard_sha256(checkpoint: Checkpoint, job: Job, blocks: BlockRange) -> str:
    """Nodes rebuild a preset themselves; this hash proves they built the same weights ("": not a preset)."""
    if job.model.preset is None:
        return ""
    tensors = checkpoint.load(checkpoint.block_tensor_names(blocks.start, blocks.end), DTYPES[job.model.dtype])
    return tensors_sha256(tensors)


def assign(record: NodeRecord, blocks: BlockRange, checkpoint: Checkpoint, job: Job, job_id: str, model_id: str,
           audit: AuditLog, expected: str | None = None, trainer_peer_id: str = "") -> None:
    """Send `record` its range; `expected`: the range's shard hash when the caller has it already. The node's
    `join` event records the trainer peer its welcome named (the only peer it serves on the data plane)."""
    expected = _expected_shard_sha256(checkpoint, job, blocks) if expected is None else expected
    record.blocks = blocks
    record.state = NodeState.ASSIGNED
    audit.register_node(record.public_key, hostname=record.hello.hostname, device=record.hello.device,
                        version=record.hello.version, trainer_peer_id=trainer_peer_id)
    audit.append_event("assignment", node_id=record.node_id, block_start=blocks.start, block_end=blocks.end,
                       replica_group=replica_group(blocks.start, blocks.end))
    record.send(assignment=pb.Assignment(
        job_id=job_id, model_id=model_id, model_json=job.model.model_dump_json(exclude={"adapter"}),  # sent as tensors
        block_start=blocks.start, block_end=blocks.end, lora_json=job.lora.model_dump_json(),
        optimizer_json=job.optimizer.model_dump_json(), seed=job.seed, expected_shard_sha256=expected,
    ))
    logger.info("assigned blocks %s to node %s", blocks, record.node_id)


def wait_until_ready(membership: Membership, nodes: list[NodeRecord], job: Job, local: LocalNodes | None) -> None:
    deadline = time.monotonic() + job.swarm.join_timeout_s
    while not membership.wait_until(lambda m: all(r.state is NodeState.READY for r in nodes), timeout=0.5):
        for record in nodes:
            state = record.state
            if state is NodeState.FAILED:
                raise SwarmError(f"node {record.node_id} could not serve blocks {record.blocks}: {record.failure}")
            if state in GONE:
                raise SwarmError(f"node {record.node_id} disconnected before serving blocks {record.blocks}")
        _check_local_nodes(local)
        if time.monotonic() > deadline:
            waiting = [r.node_id for r in nodes if r.state is not NodeState.READY]
            raise JoinTimeoutError(f"nodes {', '.join(waiting)} did not load their blocks within {job.swarm.join_timeout_s:.0f} s")


def discover_chain(dht: DHT, loop: LoopThread, nodes: list[NodeRecord], checkpoint: Checkpoint, job: Job,
                   job_id: str, model_id: str, audit: AuditLog) -> RemoteChain:
    """Find every assigned node's announcement in the DHT, as any trainer would, and check they cover the
    model end to end."""
    deadline = time.monotonic() + CHAIN_DISCOVERY_TIMEOUT_S
    assigned = {record.node_id: record.blocks for record in nodes}
    while True:
        servers = [s for s in find_replicas(dht, model_id, checkpoint.num_blocks)
                   if s.node_id in assigned and (s.start, s.end) == (assigned[s.node_id].start, assigned[s.node_id].end)]
        if {s.node_id for s in servers} == set(assigned):
            break
        if time.monotonic() > deadline:
            missing = sorted(set(assigned) - {s.node_id for s in servers})
            raise SwarmError(f"the block announcements of nodes {', '.join(missing)} did not appear in the DHT; "
                             "check their logs")
        time.sleep(0.5)
    stages = [RemoteStage(s.peer_id, s.start, s.end, s.node_id) for s in servers]
    p2p = BoundedP2P(loop.run(dht.replicate_p2p()))
    chain = RemoteChain(p2p, loop, stages, job_id, job.swarm.rpc_timeout_s, audit, job.compression,
                        kv_cache=job.swarm.kv_cache, direct_channels=job.swarm.direct_channels,
                        range_parameters=checkpoint.block_parameters)
    covered = 0
    for group in chain.groups:
        if group[0].start != covered:
            raise SwarmError(f"no node serves blocks from {covered}; the placement left a gap")
        covered = group[0].end
    if covered != checkpoint.num_blocks:
        raise SwarmError(f"no node serves blocks from {covered}; the placement left a gap")
    logger.info("chain: %s", " -> ".join(" | ".join(str(s) for s in group) for group in chain.groups))
    return chain


def announced_stage(dht: DHT, model_id: str, num_blocks: int, record: NodeRecord) -> RemoteStage | None:
    """`record`'s node as a chain stage, once its announcement of its assigned range is in the DHT."""
    servers = [s for s in find_replicas(dht, model_id, num_blocks)
               if s.node_id == record.node_id and (s.start, s.end) == (record.blocks.start, record.blocks.end)]
    return RemoteStage(servers[0].peer_id, record.blocks.start, record.blocks.end, record.node_id) if servers else None


def ranges_wanting_replicas(chain: RemoteChain, joining: list[NodeRecord], membership: Membership,
                            replicas: int | str) -> dict[BlockRange, int]:
    """Ranges that take another replica, with how many they have or are getting (`joining`: nodes loading a
    range): with `replicas: auto` every range; with R replicas, those with fewer than R."""
    counts = {BlockRange(g[0].start, g[0].end): sum(membership.state_of(s.node_id) is not NodeState.LEAVING for s in g)
              for g in chain.groups if g}
    for record in joining:
        counts[record.blocks] = counts.get(record.blocks, 0) + 1
    if replicas == "auto":
        return counts
    return {blocks: count for blocks, count in counts.items() if count < replicas}
