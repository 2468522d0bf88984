"""The trainer's view of the swarm: a chain of block ranges, each served by one or more replicas (peers).

A facade over the chain's parts, each with one concern: `transport` (a call with retry and byte metering),
`groups` (which replicas serve each range), `router` (which replica takes a micro-batch), `StepSchedule` (how many micro-batches are in flight, and the
order their gradients reach each replica), `ledger` (what
attestations must say), `protocol` (forward, backward and the step, with recomputation when a replica fails),
`InferenceSession` (generation with keys and values kept on the nodes) and `state` (phase changes, replica
copies, step checkpoints, gathered tensors). Every call carries the job, step and micro-batch ids; tensors go
through hivemind P2P streams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hivemind.p2p import P2P

from coordinator.chain.attestations import AttestationLedger
from coordinator.chain.groups import ReplicaGroups
from coordinator.chain.inference import InferenceSession
from coordinator.chain.routing import Router
from coordinator.chain.schedule import StepSchedule
from coordinator.chain.stage import RangeLostError, RemoteStage
from coordinator.chain.state import ChainState
from coordinator.chain.step_protocol import StepProtocol
from coordinator.chain.transport import Transport
from swarm.audit.log import AuditLog
from swarm.config import CompressionSpec
from swarm.p2p.codecs import CODECS, codec_type
from swarm.p2p.event_loop import LoopThread
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from swarm.traffic import Traffic, total_per_stream


class RemoteChain:
    def __init__(self, p2p: P2P, loop: LoopThread, stages: list[RemoteStage], job_id: str, timeout_s: float,
                 audit: AuditLog | None = None, compression: CompressionSpec | None = None, kv_cache: bool = True,
                 direct_channels: bool = True, range_parameters: Callable[[int, int], int] | None = None):
        compression = compression or CompressionSpec()
        self.job_id = job_id
        self.kv_cache = kv_cache  # the job's swarm.kv_cache: whether generation opens inference sessions
        self.compression = compression
        self.transport = Transport(p2p, loop, job_id, timeout_s, workers=len(stages), direct_channels=direct_channels,
                                   range_parameters=range_parameters)
        self.replica_groups = ReplicaGroups(stages)
        self.router = Router(self.replica_groups)
        self.ledger = AttestationLedger(audit, job_id, codec_type(compression.forward))
        self.state = ChainState(self.transport, self.replica_groups, audit)
        self.protocol = StepProtocol(self.transport, self.replica_groups, self.router, self.ledger, self.state, compression)
        self.replica_groups.drop_listeners.append(lambda stage, reason: self.ledger.forget_node(stage.node_id))
        self.on_drop: Callable[[RemoteStage, str], None] | None = None  # the session hears of every dropped replica
        self.replica_groups.drop_listeners.append(self._tell_drop)

    def close(self) -> None:
        """Release the chain's P2P client and call threads (the session does, when the run ends)."""
        self.transport.close()

    def _tell_drop(self, stage: RemoteStage, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(stage, reason)

    # -- who serves what
    @property
    def groups(self) -> list[list[RemoteStage]]:
        """The live replicas of each range, ranges in block order."""
        return self.replica_groups.groups

    @property
    def stages(self) -> list[RemoteStage]:
        return self.replica_groups.stages

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every range, in block order, whether or not it has a replica left."""
        return list(self.replica_groups.ranges)

    @property
    def replicas(self) -> int:
        return self.replica_groups.replicas

    def drop(self, stage: RemoteStage, reason: str) -> None:
        self.replica_groups.drop(stage, reason)

    def lost(self, index: int) -> RangeLostError:
        return self.replica_groups.lost(index)

    def adopt(self, stage: RemoteStage) -> None:
        self.state.adopt(stage)

    def add_replica(self, stage: RemoteStage, phase: str, kind: str, last_step: int,
                    source: RemoteStage | None = None) -> RemoteStage:
        return self.state.add_replica(stage, phase, kind, last_step, source)

    # -- a step
    def route(self) -> list[RemoteStage]:
        return self.router.route()

    def release(self, route: list[RemoteStage]) -> None:
        self.router.release(route)

    def forward(self, hidden, attention_mask, position_ids, step: int, micro_batch: int, train: bool,
                phase: str = "train", route: list[RemoteStage] | None = None, input_grad: bool = True):
        return self.protocol.forward(hidden, attention_mask, position_ids, step, micro_batch, train, phase, route,
                                     input_grad)

    def backward(self, grad, stage_inputs, attention_mask, position_ids, step: int, micro_batch: int,
                 phase: str = "train", route: list[RemoteStage] | None = None,
                 schedule: StepSchedule | None = None) -> torch.Tensor:
        return self.protocol.backward(grad, stage_inputs, attention_mask, position_ids, step, micro_batch, phase, route,
                                      schedule)

    def schedule(self, micro_batches: int, pipeline: bool = True) -> StepSchedule:
        """A step's schedule (coordinator.chain.schedule): how many micro-batches go at once, in what order."""
        return StepSchedule(micro_batches, len(self.replica_groups.ranges), self.replicas, pipeline)

    def apply_step(self, step: int, learning_rate: float, phase: str = "train") -> None:
        self.protocol.apply_step(step, learning_rate, phase)

    def open_session(self, phase: str = "eval", step: int = -1) -> InferenceSession:
        """A generation batch's session: each range's replica keeps the keys and values of the positions sent."""
        return InferenceSession(self.transport, self.router, self.compression, phase, step)

    def call(self, stage: RemoteStage, method: str, meta: CallMeta, tensors=(), codecs=CODECS["none"]
             ) -> tuple[CallResult, list[torch.Tensor]]:
        return self.transport.call(stage, method, meta, tensors, codecs)

    # -- whole states
    def configure_phase(self, phase: str, kind: str, adapter_action: str, lora_seed: str) -> None:
        self.state.configure_phase(phase, kind, adapter_action, lora_seed)

    def restore(self, stage: RemoteStage, phase: str, tensors: dict[str, torch.Tensor]) -> None:
        self.state.restore(stage, phase, tensors)

    def load_state(self, phase: str, kind: str, last_step: int, states: dict[tuple[int, int], dict[str, torch.Tensor]],
                   checkpoint: str = "") -> None:
        """Every replica to a step checkpoint's state (ChainState.load_state); what the chain kept for later
        steps is forgotten: they are redone."""
        self.protocol.forget()
        self.ledger.forget_through(None)
        self.router.reset()
        self.state.load_state(phase, kind, last_step, states, checkpoint)

    def gather_replica_states(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        return self.state.gather_replica_states()

    def gather_step_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        return self.state.gather_step_state(step)

    def gather_adapter(self) -> dict[str, torch.Tensor]:
        return self.state.gather_adapter()

    def gather_weights(self) -> dict[str, torch.Tensor]:
        return self.state.gather_weights()

    # -- traffic
    def stream_totals(self) -> dict[str, Traffic]:
        """Each stream's traffic so far, summed over the stages."""
        return total_per_stream(stage.stream_bytes for stage in self.stages)

    @property
    def bytes_sent(self) -> int:
        return sum(stage.bytes_sent for stage in self.stages)

    @property
    def bytes_received(self) -> int:
        return sum(stage.bytes_received for stage in self.stages)
