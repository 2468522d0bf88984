"""The trainer's view of the swarm: a chain of remote stages, each a peer serving a contiguous block range.

Every call carries the job, step and micro-batch ids; tensors go through hivemind P2P streams. A stage that
lost a micro-batch's activations gets its inputs re-sent and recomputes.

With an audit log, every step reply's attestation is checked before it is appended: signed by the node's
registered key, for the job, phase, step and block range asked, and naming exactly the micro-batch inputs
(by hash) and tokens this trainer sent that node for the step. A bad one fails the run, naming the node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import runtime_pb2

from swarm.audit.attestation import SignedAttestation, check_attestation
from swarm.audit.errors import AttestationError
from swarm.audit.log import AuditLog
from swarm.audit.sketch import tensor_sha256
from swarm.config import CompressionSpec
from swarm.errors import RemoteBlockError, SwarmConnectionError
from swarm.p2p.codecs import CODECS, codec_type, round_trip
from swarm.p2p.event_loop import LoopThread
from swarm.p2p.tensors import (ADAPTER, BACKWARD, FORWARD, PHASE, RESTORE, STEP, STEP_STATE, WEIGHTS, aiter_list,
                               from_messages, to_messages)
from swarm.proto.blocks_pb2 import CallMeta, CallResult

logger = logging.getLogger("swarm.coordinator")

CALL_ATTEMPTS = 3


@dataclass
class RemoteStage:
    peer_id: PeerID
    start: int
    end: int
    node_id: str
    bytes_sent: int = 0
    bytes_received: int = 0
    # stream ("forward", "backward", "step", ...) -> [bytes sent, bytes received], counted on the wire
    stream_bytes: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"node {self.node_id} (blocks {self.start}..{self.end - 1})"


class RemoteChain:
    def __init__(self, p2p: P2P, loop: LoopThread, stages: list[RemoteStage], job_id: str, timeout_s: float,
                 audit: AuditLog | None = None, compression: CompressionSpec | None = None):
        self.p2p, self.loop, self.stages, self.job_id, self.timeout_s = p2p, loop, stages, job_id, timeout_s
        self.audit = audit
        self.compression = compression or CompressionSpec()
        self.forward_codec = codec_type(self.compression.forward)
        self.backward_codec = codec_type(self.compression.backward)
        self._parallel = ThreadPoolExecutor(max_workers=max(1, len(stages)), thread_name_prefix="chain-step")
        # (stage index, step) -> micro-batch -> (sha256 of the inputs sent, tokens): what attestations must say
        self._sent: dict[tuple[int, int], dict[int, tuple[str, int]]] = {}

    def _meta(self, stage: RemoteStage, **fields) -> CallMeta:
        return CallMeta(job_id=self.job_id, block_start=stage.start, block_end=stage.end, **fields)

    async def _call(self, stage: RemoteStage, method: str, meta: CallMeta, tensors, codecs) -> tuple[CallResult, list[torch.Tensor]]:
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), tensors, codecs)
        sent = sum(message.ByteSize() for message in requests)
        counts = stage.stream_bytes.setdefault(method.rsplit(".", 1)[-1], [0, 0])
        stage.bytes_sent += sent
        counts[0] += sent
        responses = await self.p2p.iterate_protobuf_handler(stage.peer_id, method, aiter_list(requests),
                                                            runtime_pb2.ExpertResponse)
        metadata, outputs, received = await from_messages(responses)
        stage.bytes_received += received
        counts[1] += received
        return CallResult.FromString(metadata), outputs

    def call(self, stage: RemoteStage, method: str, meta: CallMeta, tensors=(), codecs=CODECS["none"]
             ) -> tuple[CallResult, list[torch.Tensor]]:
        """One call, retried when the connection drops without a reply. Every method is safe to repeat:
        nodes answer a repeated backward from its kept result and apply a step or phase change once."""
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                result, outputs = self.loop.run(self._call(stage, method, meta, list(tensors), codecs),
                                                timeout=self.timeout_s)
                break
            except (TimeoutError, asyncio.TimeoutError):
                raise SwarmConnectionError(f"{stage} did not answer {method} within {self.timeout_s:.0f} s") from None
            except (ConnectionError, asyncio.IncompleteReadError, P2PDaemonError) as error:
                if attempt == CALL_ATTEMPTS:
                    raise SwarmConnectionError(f"{stage} failed during {method}: {error}") from None
                logger.warning("%s dropped %s without a reply; retrying (%d/%d)", stage, method, attempt, CALL_ATTEMPTS)
                time.sleep(0.2 * attempt)
            except Exception as error:
                raise SwarmConnectionError(f"{stage} failed during {method}: {type(error).__name__}: {error}") from None
        if result.status == CallResult.ERROR:
            raise RemoteBlockError(f"{stage} refused {method}: {result.error}")
        return result, outputs

    def forward(self, hidden, attention_mask, position_ids, step: int, micro_batch: int, train: bool,
                phase: str = "train") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run hidden states through every stage; also return each stage's input (for re-sending)."""
        stage_inputs = []
        for index, stage in enumerate(self.stages):
            stage_inputs.append(hidden)
            if train and self.audit is not None:  # hashed as the node will decode it
                sent = self._sent.setdefault((index, step), {})
                received = round_trip(hidden, self.forward_codec)
                sent[micro_batch] = (tensor_sha256(received), int(attention_mask.sum()))
            meta = self._meta(stage, phase=phase, step=step, micro_batch=micro_batch, train=train,
                              reply_codec=self.compression.forward)
            _, outputs = self.call(stage, FORWARD, meta, [hidden, attention_mask, position_ids], self.forward_codec)
            hidden = outputs[0]
        return hidden, stage_inputs

    def backward(self, grad, stage_inputs, attention_mask, position_ids, step: int, micro_batch: int,
                 phase: str = "train") -> torch.Tensor:
        for stage, hidden in zip(reversed(self.stages), reversed(stage_inputs)):
            meta = self._meta(stage, phase=phase, step=step, micro_batch=micro_batch,
                              reply_codec=self.compression.backward)
            result, outputs = self.call(stage, BACKWARD, meta, [grad], self.backward_codec)
            if result.status == CallResult.MISSING_ACTIVATIONS:
                meta.includes_inputs = True
                result, outputs = self.call(stage, BACKWARD, meta, [grad, hidden, attention_mask, position_ids],
                                            [self.backward_codec] + [self.forward_codec] * 3)
            grad = outputs[0]
        return grad

    def apply_step(self, step: int, learning_rate: float, phase: str = "train") -> None:
        """Every stage applies the step (all at once: nodes step and attest independently); with an audit
        log, each attestation is checked, then appended, in chain order."""
        calls = [self._parallel.submit(self.call, stage, STEP,
                                       self._meta(stage, phase=phase, step=step, learning_rate=learning_rate))
                 for stage in self.stages]
        results = [call.result() for call in calls]
        for index, (stage, (result, _)) in enumerate(zip(self.stages, results)):
            if self.audit is not None:
                signed = SignedAttestation(result.attestation, result.signature)
                try:
                    self._check(stage, signed, phase, step, self._sent.pop((index, step), {}))
                    self.audit.append_attestation(signed)
                except AttestationError as error:
                    raise AttestationError(f"{stage} sent a bad attestation for step {step}: {error}") from None
        self._sent = {key: value for key, value in self._sent.items() if key[1] > step}

    def _check(self, stage: RemoteStage, signed: SignedAttestation, phase: str, step: int,
               sent: dict[int, tuple[str, int]]) -> None:
        if not signed.payload:
            raise AttestationError("the step reply carries no attestation")
        key = self.audit.node_keys().get(stage.node_id)
        if key is None:
            raise AttestationError("the node's key was never registered in the audit log")
        attestation = check_attestation(signed, key, job_id=self.job_id, phase=phase, step=step,
                                        block_start=stage.start, block_end=stage.end)
        inputs = {batch.id: batch.input_sha256 for batch in attestation.micro_batches}
        if inputs != {micro: digest for micro, (digest, _) in sent.items()}:
            raise AttestationError(f"it lists micro-batches {sorted(inputs)} with input hashes other than the "
                                   f"{len(sent)} this trainer sent")  # fmt: skip
        tokens = sum(count for _, count in sent.values())
        if attestation.tokens != tokens:
            raise AttestationError(f"it claims {attestation.tokens} tokens; this trainer sent {tokens}")

    def configure_phase(self, phase: str, kind: str, adapter_action: str, lora_seed: str) -> None:
        for stage in self.stages:
            meta = self._meta(stage, phase=phase, phase_kind=kind, adapter_action=adapter_action, lora_seed=lora_seed)
            self.call(stage, PHASE, meta)

    def restore(self, stage: RemoteStage, phase: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set a node's blocks to `tensors` (base under checkpoint names, LoRA under PEFT names), the state
        at the end of the finished phase `phase`; sent sorted by name, the order the node takes them in."""
        names = sorted(tensors)
        self.call(stage, RESTORE, self._meta(stage, phase=phase), [tensors[name] for name in names])

    def _gather(self, method: str) -> dict[str, torch.Tensor]:
        gathered = {}
        for stage in self.stages:
            result, tensors = self.call(stage, method, self._meta(stage))
            gathered.update(zip(result.names, tensors))
        return gathered

    def gather_step_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """Each node's weights and AdamW state before and after `step`, its last applied step, by node id."""
        states = {}
        for stage in self.stages:
            result, tensors = self.call(stage, STEP_STATE, self._meta(stage, step=step))
            states[stage.node_id] = dict(zip(result.names, tensors))
        return states

    def gather_adapter(self) -> dict[str, torch.Tensor]:
        """Every node's LoRA tensors under PEFT key names."""
        return self._gather(ADAPTER)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """Every node's base block tensors under checkpoint names (to save a pretrained model)."""
        return self._gather(WEIGHTS)

    def stream_totals(self) -> dict[str, list[int]]:
        """Bytes [sent, received] per stream so far, summed over the stages."""
        totals: dict[str, list[int]] = {}
        for stage in self.stages:
            for stream, (sent, received) in stage.stream_bytes.items():
                total = totals.setdefault(stream, [0, 0])
                total[0] += sent
                total[1] += received
        return totals

    @property
    def bytes_sent(self) -> int:
        return sum(stage.bytes_sent for stage in self.stages)

    @property
    def bytes_received(self) -> int:
        return sum(stage.bytes_received for stage in self.stages)
