"""`swarm-node join`: authenticate (both ways), join the DHT, load the assigned blocks, serve them until the job
ends."""

from __future__ import annotations

import importlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.p2p import PeerID

import swarm
from node.block_server import DEFAULT_MAX_REQUEST_BYTES, BlockServer
from node.control_client import ControlSession
from node.coordinator_trust import CoordinatorTrust
from node.inference_sessions import DEFAULT_IDLE_S, DEFAULT_MEMORY_BYTES, InferenceSessions
from node.shard import Shard
from swarm.block_range import BlockRange
from swarm.config import LoraSpec, ModelSpec, OptimizerSpec
from swarm.errors import ModelSourceError, SwarmError
from swarm.identity import Identity
from swarm.memory import device_memory_bytes, format_bytes, rss_bytes
from swarm.models.checkpoint import DTYPES, Checkpoint, resolve_model
from swarm.p2p.announce import announce_blocks
from swarm.p2p.dht_process import start_dht
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.framing import BoundedP2P
from swarm.proto import control_pb2 as pb

logger = logging.getLogger("swarm.node")

ANNOUNCE_TTL_S = 30.0
# A store can fail while the node's DHT is still meeting its neighbours (seen once: the chaos test's nodes joining
# on 2 cores beside the rest of the suite): the first announcement is tried this many times, this far apart.
ANNOUNCE_ATTEMPTS = 5
ANNOUNCE_RETRY_S = 1.0
HAND_OFF_WAIT_S = 60.0  # how long a node asked to stop serves on, waiting to be taken out of the chain


@dataclass
class NodeOptions:
    coordinator: CoordinatorTrust  # its address and the key it must prove (node.coordinator_trust)
    key_path: Path
    device: str = "cpu"
    host: str = "127.0.0.1"
    cache_dir: Path | None = None
    connect_timeout_s: float = 20.0
    assignment_timeout_s: float = 3600.0
    dishonest: str | None = None  # research only: see node.dishonest.DISHONEST_MODES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    session_memory_bytes: int = DEFAULT_MEMORY_BYTES  # keys and values kept for generation (node.inference_sessions)
    session_idle_s: float = DEFAULT_IDLE_S
    channel_port: int | None = 0  # the direct data channel's TCP port on `host` (0: any free one; None: no channel)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SwarmError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise SwarmError(f"--device {name}: expected cpu or cuda[:N]")
    return torch.device(name)


def run_node(options: NodeOptions) -> None:
    device = resolve_device(options.device)
    identity = Identity.load_or_create(options.key_path)
    print(f"node identity {identity.fingerprint} (key {options.key_path})", flush=True)
    session = ControlSession(options.coordinator, options.connect_timeout_s)
    hello = pb.NodeHello(public_key=identity.public_key, device=str(device), memory_bytes=device_memory_bytes(device),
                         version=swarm.__version__, hostname=socket.gethostname())
    try:
        # Outside the try below: a coordinator that did not prove its key is told nothing, not even a failure.
        welcome = session.authenticate(identity, hello, options.connect_timeout_s)
    except BaseException:
        session.close(drain_timeout=0)
        raise
    dht = loop = server = None
    stop_heartbeats = threading.Event()
    try:
        logger.info("joined job %s as %s; starting the DHT", welcome.job_id, welcome.node_id)
        # Assigned before its process starts, so a Ctrl-C during the start still reaches dht.shutdown() below
        # (otherwise the forked DHT process outlives the node).
        dht = DHT(initial_peers=list(welcome.initial_peers), host_maddrs=[f"/ip4/{options.host}/tcp/0"], start=False)
        start_dht(dht)
        _start_heartbeats(session, welcome.heartbeat_interval_s, stop_heartbeats)
        # Said only now, so that "waiting" means what it says: Ctrl-C from here on leaves at once.
        logger.info("in the DHT; waiting for an assignment")

        assignment = _wait_for_assignment(session, options.assignment_timeout_s)
        if assignment is None:
            return
        shard, ready = _load_shard(assignment, device, options.cache_dir, options.dishonest,
                                   InferenceSessions(options.session_memory_bytes, options.session_idle_s))
        if options.dishonest:
            logger.warning("RESEARCH MODE: this node lies in every step it attests (%s)", options.dishonest)
        print(
            f"serving blocks {BlockRange(assignment.block_start, assignment.block_end)} of {assignment.model_id} "
            f"on {device}: {format_bytes(ready.shard_bytes)} of base weights, "
            f"process memory {format_bytes(ready.rss_after_load)}",
            flush=True,
        )
        loop = LoopThread()
        server = BlockServer(shard, assignment.job_id, identity, trainer_peer(welcome.initial_peers),
                             options.max_request_bytes)
        p2p = BoundedP2P(loop.run(dht.replicate_p2p()))
        loop.run(server.add_handlers(p2p, channel_host=None if options.channel_port is None else options.host,
                                     channel_port=options.channel_port or 0))
        ready.peer_id = dht.peer_id.to_base58()
        ready.maddrs.extend(str(addr) for addr in dht.get_visible_maddrs())
        def announce() -> bool:
            return announce_blocks(dht, assignment.model_id, assignment.block_start, assignment.block_end,
                                   welcome.node_id, "online", ANNOUNCE_TTL_S)

        if not _announced_at_start(announce):
            raise SwarmError(f"could not announce the blocks in the DHT ({ANNOUNCE_ATTEMPTS} attempts)")
        session.send(ready=ready)
        try:
            _serve_until_finished(session, announce)
        except KeyboardInterrupt:
            _hand_off(session, announce)
    except KeyboardInterrupt:
        session.send(leave=pb.Leave(reason="stopped by the operator"))
        print("stopped; left the swarm", flush=True)
    except SwarmError as error:
        session.send(failure=pb.NodeFailure(message=str(error)))
        raise
    finally:
        stop_heartbeats.set()
        if server is not None:
            server.shutdown()
        session.close()
        if loop is not None:
            loop.shutdown()
        if dht is not None:
            dht.shutdown()


def trainer_peer(initial_peers) -> PeerID:
    """The trainer talks through the coordinator's DHT peer, whose id ends its multiaddrs (`.../p2p/<id>`)."""
    ids = {address.rsplit("/p2p/", 1)[-1] for address in initial_peers if "/p2p/" in address}
    if len(ids) != 1:
        raise SwarmError(f"the coordinator's welcome names {len(ids)} peer ids, expected one: {list(initial_peers)}")
    return PeerID.from_base58(ids.pop())


def _start_heartbeats(session: ControlSession, interval: float, stop: threading.Event) -> None:
    def beat() -> None:
        while not stop.wait(interval):
            session.send(heartbeat=pb.Heartbeat(rss_bytes=rss_bytes(), state="alive"))

    threading.Thread(target=beat, name="heartbeats", daemon=True).start()


def _wait_for_assignment(session: ControlSession, timeout: float) -> pb.Assignment | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = session.receive(timeout=1.0)
        if message is None:
            continue
        kind = message.WhichOneof("kind")
        if kind == "assignment":
            return message.assignment
        if kind == "finish":
            logger.info("the job ended before this node was needed: %s", message.finish.reason)
            return None
    raise SwarmError(f"no assignment from the coordinator within {timeout:.0f} s")


def _load_shard(assignment: pb.Assignment, device: torch.device, cache_dir: Path | None,
                dishonest: str | None = None, sessions: InferenceSessions | None = None) -> tuple[Shard, pb.NodeReady]:
    model = ModelSpec.model_validate_json(assignment.model_json)
    dtype = DTYPES[model.dtype]
    checkpoint = Checkpoint.open(resolve_model(model, cache_dir))
    importlib.import_module(checkpoint.family.module)  # so the memory growth below is the shard, not code
    rss_before = rss_bytes()
    shard = Shard(
        checkpoint, assignment.block_start, assignment.block_end,
        LoraSpec.model_validate_json(assignment.lora_json),
        OptimizerSpec.model_validate_json(assignment.optimizer_json),
        assignment.seed, dtype, device, dishonest, sessions,
    )
    if assignment.expected_shard_sha256 and assignment.expected_shard_sha256 != shard.blocks.base_sha256:
        raise ModelSourceError(
            f"blocks {BlockRange(assignment.block_start, assignment.block_end)} loaded here differ from the coordinator's "
            f"(sha256 {shard.blocks.base_sha256[:12]} vs {assignment.expected_shard_sha256[:12]})"
        )
    ready = pb.NodeReady(shard_bytes=shard.blocks.base_bytes, rss_before_load=rss_before, rss_after_load=rss_bytes(),
                         shard_sha256=shard.blocks.base_sha256, dtype=model.dtype)
    return shard, ready


def _hand_off(session: ControlSession, announce) -> None:
    """Ctrl-C while serving: ask to be taken out of the chain at the next step boundary and serve until then,
    so no step has to redo this node's share. A second Ctrl-C, or no answer in HAND_OFF_WAIT_S, leaves now."""
    session.send(leave=pb.Leave(reason="stopped by the operator", hand_off=True))
    print(f"leaving: serving until the trainer takes this node out of the chain (at most {HAND_OFF_WAIT_S:.0f} s; "
          "Ctrl-C again to leave now)", flush=True)
    if not _serve_until_finished(session, announce, deadline=time.monotonic() + HAND_OFF_WAIT_S):
        raise KeyboardInterrupt
    print("handed off; left the swarm", flush=True)


def _announced_at_start(announce) -> bool:
    """Whether `announce()` succeeded within ANNOUNCE_ATTEMPTS tries (each failure logged)."""
    for attempt in range(1, ANNOUNCE_ATTEMPTS + 1):
        if announce():
            return True
        if attempt < ANNOUNCE_ATTEMPTS:
            logger.warning("could not announce the blocks in the DHT (attempt %d of %d); trying again", attempt,
                           ANNOUNCE_ATTEMPTS)
            time.sleep(ANNOUNCE_RETRY_S)
    return False


def _serve_until_finished(session: ControlSession, announce, deadline: float | None = None) -> bool:
    """Serve until the coordinator says finish (True) or `deadline` passes (False)."""
    next_announce = time.monotonic() + ANNOUNCE_TTL_S / 3
    while True:
        message = session.receive(timeout=1.0)
        if message is not None and message.WhichOneof("kind") == "finish":
            logger.info("job finished: %s", message.finish.reason)
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        if time.monotonic() >= next_announce:
            announce()
            next_announce = time.monotonic() + ANNOUNCE_TTL_S / 3

