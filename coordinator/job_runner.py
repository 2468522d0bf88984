"""`swarm-coordinator run`: bring up the DHT and control service, gather nodes, assign blocks, train, export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind import DHT

from coordinator.baseline import measure_baseline
from coordinator.control_service import (ControlService, JobStatus, end_sessions, query_peak_memory,
                                         release_node, start_control_server)
from coordinator.cost_share import BASELINE_FILE
from coordinator.local_nodes import LocalNodes
from coordinator.membership import Membership, NodeRecord, heartbeat_timeout_s
from coordinator.remote_chain import RangeLostError, RemoteChain, RemoteStage
from coordinator.run_dir import MetricsLog, create_run_dir
from coordinator.scheduler import BlockRange, place_replicas
from coordinator.phases import PhaseContext, record_checkpoint, run_phases
from coordinator.report import write_report
from coordinator.resume import (ResumeError, ResumePoint, find_resume_point, prepare_run_dir, restore_context,
                                restore_nodes)
from coordinator.status import LiveStatus
from coordinator.status_server import StatusServer
from coordinator.sweep import run_sweep
from coordinator.tensorboard import TensorBoardLog
from swarm.audit.attestation import replica_group
from swarm.audit.log import AuditLog
from swarm.config import Job, load_job
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import load_tokenizer
from swarm.errors import JobFileError, JoinTimeoutError, ModelSourceError, SwarmError
from swarm.identity import Identity
from swarm.models.blocks import TrainerHead
from swarm.models.checkpoint import DTYPES, Checkpoint, resolve_model, tensors_sha256
from swarm.p2p.announce import find_replicas
from swarm.p2p.event_loop import LoopThread
from swarm.proto import control_pb2 as pb

logger = logging.getLogger("swarm.coordinator")

CHAIN_DISCOVERY_TIMEOUT_S = 60.0
LOCAL_NODE_START_TIMEOUT_S = 300.0  # a process of ours that has not joined by then is stuck, not slow


@dataclass
class RunOptions:
    job_file: Path
    runs_root: Path = Path("runs")
    run_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    local_nodes: int = 0
    cache_dir: Path | None = None
    node_threads: int | None = None
    progress: bool = True
    status_host: str = "127.0.0.1"
    status_port: int | None = None  # the status page's port (0: any free one); None: no page
    status_linger_s: float = 0.0  # keep serving the page this long after the job ends
    baseline: bool = True  # time the one-machine baseline after the job


@dataclass
class PreparedJob:
    job: Job
    checkpoint: Checkpoint
    tokenizer: object
    data: TrainingData  # the first phase's data


def prepare_job(options: RunOptions, job: Job | None = None) -> PreparedJob:
    """Everything that can fail because of the job file, checked before any process starts."""
    job = job or load_job(options.job_file)
    checkpoint = Checkpoint.open(resolve_model(job.model, options.cache_dir))
    if job.swarm.min_nodes > checkpoint.num_blocks:
        raise JobFileError(
            f"{options.job_file}: swarm.min_nodes ({job.swarm.min_nodes}) exceeds the model's {checkpoint.num_blocks} blocks"
        )
    tokenizer = load_tokenizer(checkpoint.path)
    if tokenizer.vocab_size > checkpoint.config.vocab_size:
        raise ModelSourceError(
            f"{checkpoint.path}: tokenizer has {tokenizer.vocab_size} ids but the model only {checkpoint.config.vocab_size}"
        )
    first = job.phase_list[0]
    data = TrainingData(job.data, tokenizer, job.seed, first.batch_size or job.training.batch_size, first, job.backdoor)
    data.batch(0)  # surfaces unreadable data files and over-long examples now
    return PreparedJob(job, checkpoint, tokenizer, data)


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
        self.loop = LoopThread()
        service = ControlService(self.identity, self.membership, self.status,
                                 [str(a) for a in self.dht.get_visible_maddrs()], self.job.swarm.heartbeat_interval_s,
                                 allowed=set(self.job.nodes.allow) if self.job.nodes.allow else None)
        self.server, port = start_control_server(service, options.host, options.port)
        self.address = f"{options.host}:{port}"
        print(f"coordinator {self.identity.fingerprint} for job {self.job_id} listening on {self.address}", flush=True)
        print(f"run directory: {self.run_dir}", flush=True)
        print(f"join with: swarm-node join --coordinator {self.address}", flush=True)
        self.live.address = self.address
        if options.status_port is not None:
            self.status_page = StatusServer(self.live.snapshot, options.status_host, options.status_port).start()
            print(f"status page: {self.status_page.url}", flush=True)
        if options.local_nodes:
            self.local = LocalNodes(options.local_nodes, self.address, self.run_dir, options.cache_dir,
                                    options.node_threads)
        return self

    def gather(self) -> RemoteChain:
        self.status.phase = "waiting for nodes"
        self.nodes = _wait_for_nodes(self.membership, self.job, self.local, self.address)
        self.status.phase = "loading blocks"
        _assign_blocks(self.nodes, self.checkpoint, self.job, self.job_id, self.model_id, self.audit)
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
            if state in ("down", "left", "failed"):
                self.chain.drop(stage, f"its node is {state}")
            elif state == "leaving" and len(self._group_of(stage)) > 1:
                self.chain.drop(stage, "it left, handing its range over at a step boundary")
                release_node(self.membership, records[stage.node_id], "taken out of the chain; goodbye")
        for record in [r for r in self.joining if r.state == "leaving"]:
            self.joining.remove(record)
            release_node(self.membership, record, "left before serving")
        for index, group in enumerate(self.chain.groups):
            if not group:
                raise self.chain.lost(index)
        wanted = self._ranges_wanting_replicas()
        known = {record.node_id for record in self.nodes + self.joining}
        for record in self.membership.nodes("joined"):
            if not wanted or record.node_id in known:
                continue
            blocks = min(wanted, key=lambda b: (wanted[b], b.start))
            wanted[blocks] += 1
            _assign(record, blocks, self.checkpoint, self.job, self.job_id, self.model_id, self.audit)
            self.joining.append(record)
            wanted = self._ranges_wanting_replicas()
        for record in list(self.joining):
            if record.state in ("failed", "down", "left"):
                logger.warning("node %s dropped out before serving blocks %s", record.node_id, record.blocks)
                self.joining.remove(record)
            elif record.state == "ready":
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
        for record in [r for r in self.joining if r.state in ("failed", "down", "left", "leaving")]:
            self.joining.remove(record)
        record = next((r for r in self.joining if r.blocks == blocks), None)
        if record is None:
            known = {r.node_id for r in self.nodes + self.joining}
            free = [r for r in self.membership.nodes("joined") if r.node_id not in known]
            if not free:
                self.membership.wait_until(lambda m: any(r.node_id not in known for r in m.nodes("joined")),
                                           timeout=1.0)
                return False
            record = free[0]
            _assign(record, blocks, self.checkpoint, self.job, self.job_id, self.model_id, self.audit)
            self.joining.append(record)
        while record.state != "ready":
            if record.state in ("failed", "down", "left", "leaving") or time.monotonic() > deadline:
                logger.warning("node %s did not take over blocks %s (%s)", record.node_id, blocks,
                               record.failure or record.state)
                return False
            self.membership.wait_until(lambda m: record.state != "assigned", timeout=0.5)
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
        if record is not None and record.state == "ready":
            record.send(finish=pb.Finish(reason=f"taken out of the chain: {reason}"))

    def _group_of(self, stage: RemoteStage) -> list[RemoteStage]:
        return next(group for group in self.chain.groups if stage in group)

    def _ranges_wanting_replicas(self) -> dict[BlockRange, int]:
        """Ranges that take another replica, with how many they have or are getting: with `replicas: auto`
        every range; with R replicas, those with fewer than R."""
        counts = {BlockRange(g[0].start, g[0].end): sum(self.membership.state_of(s.node_id) != "leaving" for s in g)
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


def run_job(options: RunOptions) -> Path:
    job = load_job(options.job_file)
    if job.sweep is not None:
        return _run_sweep(options, job)
    prepared = prepare_job(options, job)
    run_dir = create_run_dir(options.runs_root, job.name, options.job_file, options.run_dir)
    return _run_in(prepared, run_dir, options)


def resume_job(options: RunOptions) -> Path:
    """Continue the run in `options.run_dir` after its coordinator died (coordinator.resume): the phases it
    finished are kept, the interrupted one is run again from its start, then the rest."""
    run_dir = options.run_dir
    job_file = run_dir / "job.yaml"
    if not job_file.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no job.yaml)")
    job = load_job(job_file)
    if job.sweep is not None:
        raise ResumeError(f"{run_dir} is a sweep; resume one of its runs in {run_dir / 'sizes'} instead")
    options = dataclasses.replace(options, job_file=job_file)
    prepared = prepare_job(options, job)
    point = find_resume_point(run_dir, job, prepared.checkpoint)
    prepare_run_dir(run_dir, job, point)
    logger.info("resuming %s at phase %s (step %d); finished: %s", run_dir, point.phase or "(export)", point.step,
                ", ".join(point.finished) or "none")
    return _run_in(prepared, run_dir, options, point)


def _run_in(prepared: PreparedJob, run_dir: Path, options: RunOptions, resume: ResumePoint | None = None) -> Path:
    """Train the job's phases (from `resume`'s on, when given) over a fresh swarm session and export."""
    job = prepared.job
    file_log = logging.FileHandler(run_dir / "coordinator.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("swarm").addHandler(file_log)
    try:
        with SwarmSession(prepared, run_dir, options, resume) as session:
            chain = session.gather()
            metrics = MetricsLog(run_dir / "metrics.jsonl", subscribers=[TensorBoardLog(run_dir)])
            context = PhaseContext(job, prepared.checkpoint, prepared.tokenizer, chain, session.head, run_dir, metrics,
                                   progress=options.progress, on_step=session.record_step,
                                   before_step=session.admit_nodes, recover=session.recover, audit=session.audit)
            first_phase, evaluate_start = 0, True
            try:
                if resume is not None:
                    session.status.phase = "restoring"
                    restore_context(context, resume)
                    restore_nodes(chain, job, resume)
                    session.record_step(resume.step)
                    first_phase, evaluate_start = resume.first_phase, not resume.start_evaluated
                session.status.phase = "train"
                final_adapter = run_phases(context, first_phase, evaluate_start,
                                           resume.checkpoint if resume is not None else None)
            finally:
                metrics.close()
            session.status.phase = "exporting"
            if final_adapter is not None:
                shutil.copytree(final_adapter, run_dir / "adapter")
                record_checkpoint(context, run_dir / "adapter", job.phase_list[-1].name)
            query_peak_memory(session.membership, session.nodes, timeout=max(5.0, 3 * job.swarm.heartbeat_interval_s))
            _write_nodes_summary(run_dir, session.nodes, chain)
            session.status.phase = "done"
        # After the nodes stopped, so the one-machine baseline has the cores to itself.
        if options.baseline:
            measure_baseline(options.job_file, prepared.checkpoint.path, run_dir / BASELINE_FILE)
        else:
            (run_dir / BASELINE_FILE).write_text(json.dumps({"skipped": "not measured (--no-baseline)"}, indent=2))
        write_report(run_dir)
        logger.info("job complete: adapter in %s", run_dir / "adapter")
        return run_dir
    finally:
        logging.getLogger("swarm").removeHandler(file_log)
        file_log.close()


def _run_sweep(options: RunOptions, job: Job) -> Path:
    sweep_dir = create_run_dir(options.runs_root, job.name, options.job_file, options.run_dir)

    def run_one(job_file: Path, run_dir: Path) -> None:
        run_job(dataclasses.replace(options, job_file=job_file, run_dir=run_dir))

    summary = run_sweep(job, options.job_file, sweep_dir, run_one, options.cache_dir)
    logger.info("sweep complete: %s", summary)
    return sweep_dir


def _check_local_nodes(local: LocalNodes | None) -> None:
    if local is None:
        return
    for index, code in local.exited():
        raise SwarmError(f"local node {index} exited with code {code}; its log ends with:\n{local.log_tail(index)}")


def _wait_for_nodes(membership: Membership, job: Job, local: LocalNodes | None, address: str) -> list[NodeRecord]:
    """Wait for `swarm.min_nodes` joined nodes. The join timeout is the time other volunteers get: its clock
    starts once the local nodes this coordinator started have joined (their start-up, seconds of imports on a
    cold cache, is not theirs to wait for); a local node that exits or never joins is an error of its own."""
    needed = job.swarm.min_nodes
    if local is not None:
        _wait_for_local_nodes(membership, local, min(local.count, needed))
    deadline = time.monotonic() + job.swarm.join_timeout_s
    while not membership.wait_until(lambda m: len(m.nodes("joined")) >= needed, timeout=0.5):
        _check_local_nodes(local)
        if time.monotonic() > deadline:
            joined = len(membership.nodes("joined"))
            raise JoinTimeoutError(
                f"only {joined} of the {needed} nodes the job needs (swarm.min_nodes) joined within "
                f"{job.swarm.join_timeout_s:.0f} s (swarm.join_timeout_s); start more with: "
                f"swarm-node join --coordinator {address}"
            )
    return membership.nodes("joined")


def _wait_for_local_nodes(membership: Membership, local: LocalNodes, count: int) -> None:
    deadline = time.monotonic() + LOCAL_NODE_START_TIMEOUT_S
    while not membership.wait_until(lambda m: len(m.nodes("joined")) >= count, timeout=0.5):
        _check_local_nodes(local)
        if time.monotonic() > deadline:
            raise JoinTimeoutError(
                f"the local nodes started with --local-nodes did not join within {LOCAL_NODE_START_TIMEOUT_S:.0f} s; "
                f"their logs are in {local.logs_dir}"
            )


def _assign_blocks(nodes: list[NodeRecord], checkpoint: Checkpoint, job: Job, job_id: str, model_id: str,
                   audit: AuditLog) -> None:
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
        _assign(record, blocks, checkpoint, job, job_id, model_id, audit, expected[blocks])


def _expected_shard_sha256(checkpoint: Checkpoint, job: Job, blocks: BlockRange) -> str:
    """Nodes rebuild a preset themselves; this hash proves they built the same weights ("": not a preset)."""
    if job.model.preset is None:
        return ""
    tensors = checkpoint.load(checkpoint.block_tensor_names(blocks.start, blocks.end), DTYPES[job.model.dtype])
    return tensors_sha256(tensors)


def _assign(record: NodeRecord, blocks: BlockRange, checkpoint: Checkpoint, job: Job, job_id: str, model_id: str,
            audit: AuditLog, expected: str | None = None) -> None:
    """Send `record` its range; `expected`: the range's shard hash when the caller has it already."""
    expected = _expected_shard_sha256(checkpoint, job, blocks) if expected is None else expected
    record.blocks = blocks
    record.state = "assigned"
    audit.register_node(record.public_key, hostname=record.hello.hostname, device=record.hello.device,
                        version=record.hello.version)
    audit.append_event("assignment", node_id=record.node_id, block_start=blocks.start, block_end=blocks.end,
                       replica_group=replica_group(blocks.start, blocks.end))
    record.send(assignment=pb.Assignment(
        job_id=job_id, model_id=model_id, model_json=job.model.model_dump_json(),
        block_start=blocks.start, block_end=blocks.end, lora_json=job.lora.model_dump_json(),
        optimizer_json=job.optimizer.model_dump_json(), seed=job.seed, expected_shard_sha256=expected,
    ))
    logger.info("assigned blocks %s to node %s", blocks, record.node_id)


def _wait_until_ready(membership: Membership, nodes: list[NodeRecord], job: Job, local: LocalNodes | None) -> None:
    deadline = time.monotonic() + job.swarm.join_timeout_s
    while not membership.wait_until(lambda m: all(r.state == "ready" for r in nodes), timeout=0.5):
        for record in nodes:
            if record.state == "failed":
                raise SwarmError(f"node {record.node_id} could not serve blocks {record.blocks}: {record.failure}")
            if record.state in ("down", "left"):
                raise SwarmError(f"node {record.node_id} disconnected before serving blocks {record.blocks}")
        _check_local_nodes(local)
        if time.monotonic() > deadline:
            waiting = [r.node_id for r in nodes if r.state != "ready"]
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
    chain = RemoteChain(p2p, loop, stages, job_id, job.swarm.rpc_timeout_s, audit, job.compression)
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
        if record.node_id in registered and record.state in ("left", "failed", "down"):
            audit.append_event("leave", node_id=record.node_id, state=record.state, reason=record.failure)


def _write_nodes_summary(run_dir: Path, nodes: list[NodeRecord], chain: RemoteChain) -> None:
    by_node = {stage.node_id: stage for stage in chain.stages}
    summary = []
    for record in nodes:
        stage = by_node.get(record.node_id)
        summary.append({
            "node_id": record.node_id, "device": record.hello.device, "hostname": record.hello.hostname,
            "blocks": [record.blocks.start, record.blocks.end],
            "shard_bytes": record.ready.shard_bytes, "shard_sha256": record.ready.shard_sha256,
            "rss_before_load": record.ready.rss_before_load, "rss_after_load": record.ready.rss_after_load,
            "bytes_to_node": stage.bytes_sent if stage else 0, "bytes_from_node": stage.bytes_received if stage else 0,
            # the node's own high-water marks, as it last reported them over the control plane
            "peak_rss_bytes": record.memory.peak_rss_bytes if record.memory else None,
            "peak_device_bytes": record.memory.peak_device_bytes if record.memory else None,
        })
    (run_dir / "nodes.json").write_text(json.dumps(summary, indent=2))
