"""The coordinator's live swarm: DHT, control service, joined nodes, the chain, admitting replicas between steps,
and takeover of a range that lost its last replica; putting the chain together is coordinator.assembly's."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path

import torch
from hivemind import DHT

from coordinator.assembly import (announced_stage, assign, assign_blocks, discover_chain, ranges_wanting_replicas,
                                  wait_for_nodes, wait_until_ready)
from coordinator.chain import RangeLostError, RemoteChain, RemoteStage
from coordinator.control_service import ControlService, JobStatus, end_sessions, release_node, start_control_server
from coordinator.local_nodes import LocalNodes
from coordinator.membership import Membership, NodeRecord, heartbeat_timeout_s
from coordinator.prepared_job import PreparedJob, RunOptions
from coordinator.resume import ResumePoint
from coordinator.status import LiveStatus
from coordinator.status_server import StatusServer
from swarm.audit.log import AuditLog
from swarm.block_range import BlockRange
from swarm.errors import SwarmError
from swarm.identity import Identity
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import DTYPES
from swarm.node_state import GONE, GONE_OR_LEAVING, NodeState
from swarm.p2p.dht_process import start_dht
from swarm.p2p.event_loop import LoopThread
from swarm.proto import control_pb2 as pb

logger = logging.getLogger("swarm.coordinator")


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
        self.dht = DHT(start=False, host_maddrs=[f"/ip4/{options.host}/tcp/0"])
        start_dht(self.dht)
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
                                    options.node_threads, fork=options.fork_nodes,
                                    micro_batches=self.job.training.micro_batches)
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
        self.nodes = wait_for_nodes(self.membership, self.job, self.local, self.address, self.identity.fingerprint)
        self.status.phase = "loading blocks"
        assign_blocks(self.nodes, self.checkpoint, self.job, self.job_id, self.model_id, self.audit,
                      self.trainer_peer_id)
        wait_until_ready(self.membership, self.nodes, self.job, self.local)
        self.chain = discover_chain(self.dht, self.loop, self.nodes, self.checkpoint, self.job, self.job_id,
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
        wanted = ranges_wanting_replicas(self.chain, self.joining, self.membership, self.job.swarm.replicas)
        known = {record.node_id for record in self.nodes + self.joining}
        for record in self.membership.nodes(NodeState.JOINED):
            if not wanted or record.node_id in known:
                continue
            blocks = min(wanted, key=lambda b: (wanted[b], b.start))
            wanted[blocks] += 1
            assign(record, blocks, self.checkpoint, self.job, self.job_id, self.model_id, self.audit,
                   trainer_peer_id=self.trainer_peer_id)
            self.joining.append(record)
            wanted = ranges_wanting_replicas(self.chain, self.joining, self.membership, self.job.swarm.replicas)
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
            assign(record, blocks, self.checkpoint, self.job, self.job_id, self.model_id, self.audit,
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
        return announced_stage(self.dht, self.model_id, self.checkpoint.num_blocks, record)

    def _dropped(self, stage: RemoteStage, reason: str) -> None:
        """A replica taken out of the chain after a failure: if its node still runs (a call timed out, say), it
        is told to stop rather than wait for calls that will not come (a dead one just goes down)."""
        record = next((r for r in self.nodes if r.node_id == stage.node_id), None)
        if record is not None and record.state is NodeState.READY:
            record.send(finish=pb.Finish(reason=f"taken out of the chain: {reason}"))

    def _group_of(self, stage: RemoteStage) -> list[RemoteStage]:
        return next(group for group in self.chain.groups if stage in group)

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


def _record_departures(audit: AuditLog, nodes: list[NodeRecord]) -> None:
    """A `leave` event for every registered node the control plane saw leave, fail or disconnect."""
    registered = audit.node_keys()
    for record in nodes:
        if record.node_id in registered and record.state in GONE:
            audit.append_event("leave", node_id=record.node_id, state=record.state, reason=record.failure)
