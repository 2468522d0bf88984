"""Calls that move a range's whole state rather than a micro-batch: phase changes, restoring a finished phase,
copying a replica (a node joining mid-job), step checkpoints out (gather) and back in (load), and the
tensors the trainer saves (adapters, pretrained weights, replay snapshots)."""

from __future__ import annotations

import torch

from coordinator.chain.groups import ReplicaGroups
from coordinator.chain.stage import RemoteStage
from coordinator.chain.transport import Transport
from swarm.audit.log import AuditLog
from swarm.errors import RemoteBlockError, SwarmConnectionError, SwarmError
from swarm.p2p.rpc import ADAPTER, ADMIT, LOAD_STATE, PHASE, REPLICA_STATE, RESTORE, STEP_STATE, SYNC, WEIGHTS
from swarm.proto.blocks_pb2 import CallResult


class ChainState:
    def __init__(self, transport: Transport, groups: ReplicaGroups, audit: AuditLog | None):
        self.transport, self.groups, self.audit = transport, groups, audit
        self.phase_kind = "sft"  # the kind of the phase the nodes were last configured for

    def configure_phase(self, phase: str, kind: str, adapter_action: str, lora_seed: str) -> None:
        """Every replica starts phase `phase`. One that dies meanwhile is dropped, as after any failed call (its
        range goes on with the others); a range left with none is lost (RangeLostError)."""
        self.phase_kind = kind
        for stage in self.groups.stages:
            meta = self.transport.meta(stage, phase=phase, phase_kind=kind, adapter_action=adapter_action,
                                       lora_seed=lora_seed)
            try:
                self.transport.call(stage, PHASE, meta)
            except SwarmConnectionError as error:
                self.groups.drop(stage, f"failed while it started phase {phase}: {error}")
        for index in range(len(self.groups.ranges)):
            self.groups.serving(index)

    def restore(self, stage: RemoteStage, phase: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set a node's blocks to `tensors` (base under checkpoint names, LoRA under PEFT names), the state
        at the end of the finished phase `phase`; sent sorted by name, the order the node takes them in."""
        names = sorted(tensors)
        self.transport.call(stage, RESTORE, self.transport.meta(stage, phase=phase), [tensors[name] for name in names])

    def add_replica(self, stage: RemoteStage, phase: str, kind: str, last_step: int,
                    source: RemoteStage | None = None) -> RemoteStage:
        """Make `stage` (a node that loaded its blocks mid-job, or a replica left behind) a replica of its
        range, between steps: a serving replica (`source`, or the fastest) admits it, it fetches that
        replica's state directly, and both must then hash to the same weights and AdamW state (logged as a
        `sync` event). Returns the source."""
        group = self.groups.groups[self.groups.index_of(stage)]
        if not group:
            raise SwarmError(f"{stage}: no serving replica of its range to copy")
        source = source or min(group, key=lambda s: s.latency_s or 0.0)
        transport = self.transport
        admitted, _ = transport.call(source, ADMIT, transport.meta(source, replica_peers=[stage.peer_id.to_base58()]))
        synced, _ = transport.call(stage, SYNC, transport.meta(stage, phase=phase, phase_kind=kind, step=last_step,
                                                               replica_peers=[source.peer_id.to_base58()],
                                                               averaging_timeout_s=transport.peer_wait_s))
        if (synced.weights_sha256, synced.optimizer_sha256) != (admitted.weights_sha256, admitted.optimizer_sha256):
            raise RemoteBlockError(f"{stage} copied {source} but hashes to other weights or optimizer state")
        if self.audit is not None:
            self.audit.append_event("sync", node_id=stage.node_id, source_node=source.node_id, step=last_step,
                                    phase=phase, weights_sha256=synced.weights_sha256,
                                    optimizer_sha256=synced.optimizer_sha256)
        self.adopt(stage)
        return source

    def adopt(self, stage: RemoteStage) -> None:
        """Put `stage` into its range's group: a replica that copied another (`add_replica`), or a node that
        took over a range with no replica left (it holds no trained state yet; `load_state` gives it a step
        checkpoint's)."""
        self.groups.adopt(stage)
        self.transport.grow(len(self.groups.stages))

    def gather_replica_states(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Each range's whole state (node.shard.Shard.replica_state) from one of its replicas, for a step
        checkpoint; a replica that fails is dropped and the next one asked."""
        states = {}
        for index, block_range in enumerate(self.groups.ranges):
            result, tensors = self._ask_a_replica(index, REPLICA_STATE)
            states[block_range] = dict(zip(result.names, tensors))
        return states

    def load_state(self, phase: str, kind: str, last_step: int, states: dict[tuple[int, int], dict[str, torch.Tensor]],
                   checkpoint: str = "") -> None:
        """Set every replica to a step checkpoint's state (`states` by range; `checkpoint` names it): phase
        `phase` after step `last_step`. The replicas of a range must then hash alike; a `load_state` audit event
        per node records what it took."""
        self.phase_kind = kind
        calls = []
        for stage in self.groups.stages:
            state = states[stage.range]
            names = sorted(state)
            meta = self.transport.meta(stage, phase=phase, phase_kind=kind, step=last_step, names=names)
            calls.append((stage, self.transport.submit(stage, LOAD_STATE, meta, [state[n] for n in names])))
        hashes = {}  # node id -> (weights, optimizer state) hashes
        for stage, call in calls:
            try:
                result = call.result()[0]
            except SwarmConnectionError as error:
                self.groups.drop(stage, str(error))
                continue
            hashes[stage.node_id] = (result.weights_sha256, result.optimizer_sha256)
        for index in range(len(self.groups.ranges)):
            if len({hashes[stage.node_id] for stage in self.groups.serving(index)}) > 1:
                raise RemoteBlockError(f"the replicas of blocks {self.groups.name(index)} hash to different states "
                                       f"after loading the same checkpoint")
        if self.audit is not None:
            for node, (weights, optimizer) in sorted(hashes.items()):
                self.audit.append_event("load_state", node_id=node, step=last_step, phase=phase, checkpoint=checkpoint,
                                        weights_sha256=weights, optimizer_sha256=optimizer)

    def gather_step_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """Each node's weights and AdamW state before and after `step`, its last applied step, by node id. A
        replica that fails the call is dropped (as after any failed call) and left out, so the snapshot holds the
        replicas still serving; a range left with none is lost (RangeLostError: the phase loop takes it over)."""
        states = {}
        for stage in self.groups.stages:
            try:
                result, tensors = self.transport.call(stage, STEP_STATE, self.transport.meta(stage, step=step))
            except SwarmConnectionError as error:
                self.groups.drop(stage, f"failed while its state after step {step} was fetched: {error}")
                continue
            states[stage.node_id] = dict(zip(result.names, tensors))
        for index in range(len(self.groups.ranges)):
            self.groups.serving(index)  # RangeLostError if the range has no replica left
        return states

    def gather_adapter(self) -> dict[str, torch.Tensor]:
        """Every node's LoRA tensors under PEFT key names."""
        return self._from_first_replicas(ADAPTER)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """Every node's base block tensors under checkpoint names (to save a pretrained model)."""
        return self._from_first_replicas(WEIGHTS)

    def _from_first_replicas(self, method: str) -> dict[str, torch.Tensor]:
        """From one replica of each range (replicas hold identical weights)."""
        gathered = {}
        for index in range(len(self.groups.ranges)):
            result, tensors = self._ask_a_replica(index, method)
            gathered.update(zip(result.names, tensors))
        return gathered

    def _ask_a_replica(self, index: int, method: str) -> tuple[CallResult, list[torch.Tensor]]:
        """`method` answered by the first replica of range `index` that answers; those that fail are dropped
        (RangeLostError when none is left)."""
        while True:
            stage = self.groups.serving(index)[0]
            try:
                return self.transport.call(stage, method, self.transport.meta(stage))
            except SwarmConnectionError as error:
                self.groups.drop(stage, str(error))
