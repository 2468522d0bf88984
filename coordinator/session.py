"""The coordinator's live swarm: DHT, control service, joined nodes, block placement, the chain, and takeover
of a range that lost its last replica."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from hivemind import DHT

from coordinator.chain import RangeLostError, RemoteChain, RemoteStage
from coordinator.control_service import ControlService, JobStatus, end_sessions, release_node, start_control_server
from coordinator.local_nodes import LocalNodes
from coordinator.membership import Membership, NodeRecord, heartbeat_timeout_s
from coordinator.prepared_job import PreparedJob, RunOptions
from coordinator.resume import ResumePoint
from coordinator.scheduler import place_replicas
from coordinator.status import LiveStatus
from coordinator.status_server import StatusServer
from swarm.audit.attestation import replica_group
from swarm.audit.log import AuditLog
from swarm.block_range import BlockRange
from swarm.config import Job
from swarm.errors import JoinTimeoutError, SwarmError
from swarm.identity import Identity
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import DTYPES, Checkpoint, tensors_sha256
from swarm.node_state import GONE, GONE_OR_LEAVING, NodeState
from swarm.p2p.announce import find_replicas
from swarm.p2p.event_loop import LoopThread
from swarm.proto import control_pb2 as pb

logger = logging.getLogger("swarm.coordinator")

CHAIN_DISCOVERY_TIMEOUT_S = 60.0
LOCAL_NODE_START_TIMEOUT_S = 300.0  # a process of ours that has not joined by then is stuck, not slow


class SwarmSession:
    """The coordinator's live swarm: DHT, control service, joined nodes and the chain that serves the model.

    `start()` brings up the DHT and gRPC service (and local nodes); `gather()` waits for nodes, assigns blocks
    and finds the chain; `close()` ends every node session and stops whatever was started, also on errors.
    The session's audit log (RUN_DIR/audit.db) is open from `start()` to `close()`, which records nodes known
    to have left or failed and signs a last tree head.
    """

    def __init__(self, prepared: PreparedJob, run_dir: Path, options: RunOptions, resume: ResumePoint | None = None):
        self.job, self.checkpoint, self.run_dir, self.options = prepared.job, prepared.checkpoint, run_dir, options
        self.resume = resume  # a resumed run continues the crashed one's job id and audit log
        self.job_id = resume.job_id if resume is not None else f"{self.job.name}-{uuid.uuid4().hex[:8]}"
        self.model_id = f"{self.job_id}.{self.checkpoint.family.model_type}"
        self.head = TrainerHead(self.checkpoint, DTYPES[self.job.model.dtype], torch.device("cpu"))
        self.identity = Identity.load_or_create(run_dir / "coordinator.key")
        self.membership = Membership()
        self.status = JobStatus(job_id=self.job_id, num_blocks=self.checkpoint.num_blocks,
                                total_steps=self.job.total_steps)
        self.dht = self.loop = self.server = self.local = self.chain = self.audit = None
        self.nodes: list[NodeRecord] = []  # the nodes serving the chain
        self.joining: list[NodeRecord] = []  # assigned mid-job, loading their blocks; not yet in the chain
        self.address = ""
        self.trainer_peer_id = ""  # the DHT peer the trainer calls from; welcomes name it, join events record it
        self.live = LiveStatus(self.membership, self.status, self.job, run_dir)
        self.status_page: StatusServer | None = None

    def start(self) -> SwarmSession:
        options = self.options
        if self.resume is not None:
            self.audit = AuditLog.open(self.run_dir / "audit.db", self.identity)
            checkpoint = self.resume.checkpoint
            self.audit.append_event("resume", from_step=self.resume.step, phase=self.resume.phase,
                                    finished_phases=self.resume.finished, discarded=self.resume.discarded,
                                    step_checkpoint=str(checkpoint.path.relative_to(self.run_dir)) if checkpoint else "")
        else:
            self.audit = AuditLog.create(
                self.run_dir / "audit.db", self.identity, self.job_id, job_name=self.job.name,
                job_sha256=hashlib.sha256((self.run_dir / "job.yaml").read_bytes()).hexdigest(),
                model=self.job.model.model_dump(mode="json"), seed=self.job.seed, total_steps=self.job.total_steps,
                phases=[phase.name for phase in self.job.phase_list],
            )
        self.dht = DHT(start=True, host_maddrs=[f"/ip4/{options.host}/tcp/0"])
        self.trainer_peer_id = self.dht.peer_id.to_base58()
        self.loop = LoopThread()
        service = ControlService(self.identity, self.membership, self.status,
                                 [str(a) for a in self.dht.get_visible_maddrs()], self.job.swarm.heartbeat_interval_s,
                                 allowed=set(self.job.nodes.allow) if self.job.nodes.allow else None)
        self.server, port = start_control_server(service, options.host, options.port)
        self.address = f"{options.host}:{port}"
        print(f"coordinator {self.identity.fingerprint} for job {self.job_id} listening on {self.address}", flush=True)
        print(f"run directory: {self.run_dir}", flush=True)
        print(f"join with: {self.join_command}", flush=True)
        self.live.address = self.address
        if options.status_port is not None:
            self.status_page = StatusServer(self.live.snapshot, options.status_host, options.status_port).start()
            print(f"status page: {self.status_page.url}", flush=True)
        if options.local_nodes:
            self.local = LocalNodes(options.local_nodes, self.join_flags, self.run_dir, options.cache_dir,
                                    options.node_threads)
        return self

    @property
    def join_flags(self) -> list[str]:
        """`swarm-node join`'s flags for this coordinator: its address and the key nodes pin."""
        return ["--coordinator", self.address, "--coordinator-key", self.identity.pin]

    @property
    def join_command(self) -> str:
        return " ".join(["swarm-node", "join", *self.join_flags])

    def gather(self) -> RemoteChain:
        self.status.phase = "waiting for nodes"
        self.nodes = _wait_for_nodes(self.membership, self.job, self.local, self.address, self.identity.fingerprint)
        self.status.phase = "loading blocks"
        _assign_blocks(self.nodes, self.checkpoint, self.job, self.job_id, self.model_id, self.audit,
                       self.trainer_peer_id)
        _wait_until_ready(self.membership, self.nodes, self.job, self.local)
        self.chain = _discover_chain(self.dht, self.loop, self.nodes, self.checkpoint, self.job, self.job_id,
                                     self.model_id, self.audit)
        self.chain.on_drop = self._dropped
        return self.chain

    def close(self, reason: str, linger: bool = True) -> None:
        if self.audit is not None:
            try:
                _record_departures(self.audit, self.nodes)
                self.audit.sign_tree_head()
            finally:
                self.audit.close()
                self.audit = None
        end_sessions(self.membership, reason)
        if self.local is not None:
            self.local.stop()
        if self.server is not None:
            self.server.stop(grace=2).wait()
        # Each is closed here, in order, rather than left to the garbage collector: in a sweep, a run's leftover
        # P2P client collected during the next run printed asyncio tracebacks into its output.
        if self.chain is not None:
            self.chain.close()
        if self.loop is not None:
            self.loop.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        if self.status_page is not None:
            if linger:
                try:
                    time.sleep(self.options.status_linger_s)  # the page shows the job's final state meanwhile
                except KeyboardInterrupt:
                    pass
            self.status_page.stop()

    def admit_nodes(self, phase: str, kind: str, last_step: int) -> None:
        """Between steps: drop replicas whose node died or left, give nodes that joined since the start (or
        spares) a range that wants replicas, and make those that loaded their blocks replicas (each copies a
        serving replica's state first)."""
        records = {record.node_id: record for record in self.nodes + self.joining}
        for stage in list(self.chain.stages):
            state = self.membership.state_of(stage.node_id)
            if state in GONE:
                self.chain.drop(stage, f"its node is {state}")
            elif state is NodeState.LEAVING and len(self._group_of(stage)) > 1:
                self.chain.drop(stage, "it left, handing its range over at a step boundary")
                release_node(self.membership, records[stage.node_id], "taken out of the chain; goodbye")
        for record in [r for r in self.joining if r.state is NodeState.LEAVING]:
            self.joining.remove(record)
            release_node(self.membership, record, "left before serving")
        for index, group in enumerate(self.chain.groups):
            if not group:
                raise self.chain.lost(index)
        wanted = self._ranges_wanting_replicas()
        known = {record.node_id for record in self.nodes + self.joining}
        for record in self.membership.nodes(NodeState.JOINED):
            if not wanted or record.node_id in known:
                continue
            blocks = min(wanted, key=lambda b: (wanted[b], b.start))
            wanted[blocks] += 1
            _assign(record, blocks, self.checkpoint, self.job, self.job_id, self.model_id, self.audit,
                    trainer_peer_id=self.trainer_peer_id)
            self.joining.append(record)
            wanted = self._ranges_wanting_replicas()
        for record in list(self.joining):
            if record.state in GONE:
                logger.warning("node %s dropped out before serving blocks %s", record.node_id, record.blocks)
                self.joining.remove(record)
            elif record.state is NodeState.READY:
                self._add_to_chain(record, phase, kind, last_step)

    def recover(self, error: RangeLostError) -> None:
        """Give every range left without a replica a node (the phase loop then rolls every range back to the
        latest step checkpoint): one already loading that range, a spare, or the next node to join, waiting
        up to `swarm.join_timeout_s` for it to load its blocks."""
        job = self.job
        for (start, end), group in zip(self.chain.ranges, self.chain.groups):
            if group:
                continue
            blocks = BlockRange(start, end)
            self.status.phase = f"waiting for a node to take over blocks {blocks}"
            deadline = time.monotonic() + job.swarm.join_timeout_s
            try:
                while not self._fill_range(blocks, deadline):
                    if time.monotonic() > deadline:
                        raise SwarmError(f"{error}, and no node took the range over within "
                                         f"{job.swarm.join_timeout_s:.0f} s (swarm.join_timeout_s); resume the run "
                                         f"once nodes are back: swarm-coordinator resume {self.run_dir}")
            finally:
                self.status.phase = "train"

    def _fill_range(self, blocks: BlockRange, deadline: float) -> bool:
        """One try at putting a node on `blocks`, a range with no replica; False: not yet (no node free, or
        the one chosen dropped out)."""
        for record in [r for r in self.joining if r.state in GONE_OR_LEAVING]:
            self.joining.remove(record)
        record = next((r for r in self.joining if r.blocks == blocks), None)
        if record is None:
            known = {r.node_id for r in self.nodes + self.joining}
            free = [r for r in self.membership.nodes(NodeState.JOINED) if r.node_id not in known]
            if not free:
                self.membership.wait_until(lambda m: any(r.node_id not in known for r in m.nodes(NodeState.JOINED)),
                                           timeout=1.0)
                return False
            record = free[0]
            _assign(record, blocks, self.checkpoint, self.job, self.job_id, self.model_id, self.audit,
                    trainer_peer_id=self.trainer_peer_id)
            self.joining.append(record)
        while record.state is not NodeState.READY:
            if record.state in GONE_OR_LEAVING or time.monotonic() > deadline:
                logger.warning("node %s did not take over blocks %s (%s)", record.node_id, blocks,
                               record.failure or record.state)
                return False
            self.membership.wait_until(lambda m: record.state is not NodeState.ASSIGNED, timeout=0.5)
        while (stage := self._announced(record)) is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        self.chain.adopt(stage)
        self.joining.remove(record)
        self.nodes.append(record)
        logger.warning("node %s took over blocks %s", record.node_id, blocks)
        return True

    def _announced(self, record: NodeRecord) -> RemoteStage | None:
        """`record`'s node as a chain stage, once its announcement of its assigned range is in the DHT."""
        servers = [s for s in find_replicas(self.dht, self.model_id, self.checkpoint.num_blocks)
                   if s.node_id == record.node_id and (s.start, s.end) == (record.blocks.start, record.blocks.end)]
        return RemoteStage(servers[0].peer_id, record.blocks.start, record.blocks.end, record.node_id) if servers else None

    def _dropped(self, stage: RemoteStage, reason: str) -> None:
        """A replica taken out of the chain after a failure: if its node still runs (a call timed out, say), it
        is told to stop rather than wait for calls that will not come (a dead one just goes down)."""
        record = next((r for r in self.nodes if r.node_id == stage.node_id), None)
        if record is not None and record.state is NodeState.READY:
            record.send(finish=pb.Finish(reason=f"taken out of the chain: {reason}"))

    def _group_of(self, stage: RemoteStage) -> list[RemoteStage]:
        return next(group for group in self.chain.groups if stage in group)

    def _ranges_wanting_replicas(self) -> dict[BlockRange, int]:
        """Ranges that take another replica, with how many they have or are getting: with `replicas: auto`
        every range; with R replicas, those with fewer than R."""
        counts = {BlockRange(g[0].start, g[0].end): sum(self.membership.state_of(s.node_id) is not NodeState.LEAVING for s in g)
                  for g in self.chain.groups if g}
        for record in self.joining:
            counts[record.blocks] = counts.get(record.blocks, 0) + 1
        if self.job.swarm.replicas == "auto":
            return counts
        return {blocks: count for blocks, count in counts.items() if count < self.job.swarm.replicas}

    def _add_to_chain(self, record: NodeRecord, phase: str, kind: str, last_step: int) -> None:
        stage = self._announced(record)
        if stage is None:
            return  # its announcement is not in the DHT yet: next step
        source = self.chain.add_replica(stage, phase, kind, last_step)
        self.joining.remove(record)
        self.nodes.append(record)
        logger.info("node %s joined blocks %s as a replica (it copied the state of node %s after step %d)",
                    record.node_id, record.blocks, source.node_id, last_step)

    def record_step(self, step: int) -> None:
        """The trainer's per-step hook: the gRPC status and the status page's ETA clock."""
        self.status.step = step
        self.live.observe_step(step)

    def __enter__(self) -> SwarmSession:
        return self.start()

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            reason = "job complete"
        elif error_type is KeyboardInterrupt:
            reason = "coordinator stopped by the operator"
        else:
            reason = "job failed"
        self.live.ended(None if error_type is None else str(error) or error_type.__name__)
        if error_type is not None and error_type is not KeyboardInterrupt:
            self.membership.settle_liveness(heartbeat_timeout_s(self.job.swarm.heartbeat_interval_s))
        self.close(reason, linger=error_type is not KeyboardInterrupt)


def _check_local_nodes(local: LocalNodes | None) -> None:
    if local is None:
        return
    for index, code in local.exited():
        raise SwarmError(f"local node {index} exited with code {code}; its log ends with:\n{local.log_tail(index)}")


def _wait_for_nodes(membership: Membership, job: Job, local: LocalNodes | None, address: str,
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


def _assign_blocks(nodes: list[NodeRecord], checkpoint: Checkpoint, job: Job, job_id: str, model_id: str,
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
        _assign(record, blocks, checkpoint, job, job_id, model_id, audit, expected[blocks], trainer_peer_id)


def _expected_shard_sha256(checkpoint: Checkpoint, job: Job, blocks: BlockRange) -> str:
    """Nodes rebuild a preset themselves; this hash proves they built the same weights ("": not a preset)."""
    if job.model.preset is None:
        return ""
    tensors = checkpoint.load(checkpoint.block_tensor_names(blocks.start, blocks.end), DTYPES[job.model.dtype])
    return tensors_sha256(tensors)


def _assign(record: NodeRecord, blocks: BlockRange, checkpoint: Checkpoint, job: Job, job_id: str, model_id: str,
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


def _wait_until_ready(membership: Membership, nodes: list[NodeRecord], job: Job, local: LocalNodes | None) -> None:
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


def _discover_chain(dht: DHT, loop: LoopThread, nodes: list[NodeRecord], checkpoint: Checkpoint, job: Job,
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
    p2p = loop.run(dht.replicate_p2p())
    chain = RemoteChain(p2p, loop, stages, job_id, job.swarm.rpc_timeout_s, audit, job.compression,
                        kv_cache=job.swarm.kv_cache)
    covered = 0
    for group in chain.groups:
        if group[0].start != covered:
            raise SwarmError(f"no node serves blocks from {covered}; the placement left a gap")
        covered = group[0].end
    if covered != checkpoint.num_blocks:
        raise SwarmError(f"no node serves blocks from {covered}; the placement left a gap")
    logger.info("chain: %s", " -> ".join(" | ".join(str(s) for s in group) for group in chain.groups))
    return chain


def _record_departures(audit: AuditLog, nodes: list[NodeRecord]) -> None:
    """A `leave` event for every registered node the control plane saw leave, fail or disconnect."""
    registered = audit.node_keys()
    for record in nodes:
        if record.node_id in registered and record.state in GONE:
            audit.append_event("leave", node_id=record.node_id, state=record.state, reason=record.failure)
