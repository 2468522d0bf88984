"""What each node's attestation of a step must say, and the check before it enters the audit log: signed by
the node's registered key, for the job, phase, step and block range asked, naming exactly the micro-batch
inputs (by hash, as the node decoded them) and tokens this trainer sent it; replicas of a range must attest
identical weights and optimizer state after the step. A bad one fails the run, naming the node."""

from __future__ import annotations

import threading

import torch

from coordinator.chain.stage import RemoteStage
from swarm.audit.attestation import Attestation, SignedAttestation, check_attestation
from swarm.audit.errors import AttestationError
from swarm.audit.log import AuditLog
from swarm.audit.sketch import tensor_sha256
from swarm.p2p.codecs import round_trip


class AttestationLedger:
    def __init__(self, audit: AuditLog | None, job_id: str, forward_codec):
        self.audit, self.job_id, self.forward_codec = audit, job_id, forward_codec
        # (node id, step) -> micro-batch -> (sha256 of the inputs sent, tokens)
        self._sent: dict[tuple[str, int], dict[int, tuple[str, int]]] = {}
        self._lock = threading.Lock()

    def expect(self, stage: RemoteStage, step: int, micro_batch: int, hidden: torch.Tensor,
               attention_mask: torch.Tensor) -> None:
        """Note what `stage`'s attestation of `step` must list for this micro-batch."""
        if self.audit is None:
            return
        received = round_trip(hidden, self.forward_codec)
        with self._lock:
            self._sent.setdefault((stage.node_id, step), {})[micro_batch] = (tensor_sha256(received),
                                                                             int(attention_mask.sum()))

    def forget_node(self, node_id: str) -> None:
        with self._lock:
            self._sent = {key: value for key, value in self._sent.items() if key[0] != node_id}

    def forget_through(self, step: int | None = None) -> None:
        """Drop what was expected for steps up to `step` (every step: None)."""
        with self._lock:
            self._sent = {} if step is None else {key: value for key, value in self._sent.items() if key[1] > step}

    def record_step(self, group: list[RemoteStage], applied: list, phase: str, step: int) -> None:
        """Check and append the attestation of every replica in `applied` ((stage, CallResult) pairs); the
        replicas' averaging bytes go to their `average` stream."""
        names = [s.node_id for s in group] if len(group) > 1 else []
        after = {}
        for stage, result in applied:
            stage.count("average", result.averaging_bytes_sent, result.averaging_bytes_received)
            if self.audit is None:
                continue
            signed = SignedAttestation(result.attestation, result.signature)
            with self._lock:
                sent = self._sent.pop((stage.node_id, step), {})
            try:
                attestation = self._check(stage, signed, phase, step, sent, names)
                self.audit.append_attestation(signed)
            except AttestationError as error:
                raise AttestationError(f"{stage} sent a bad attestation for step {step}: {error}") from None
            after[stage.node_id] = (attestation.adapter_sha256_after, attestation.optimizer_sha256_after)
        if len(set(after.values())) > 1:
            raise AttestationError(f"the replicas of blocks {group[0].blocks} attest different "
                                   f"weights or optimizer state after step {step}: "
                                   + ", ".join(f"{n} {w[:12]}/{o[:12]}" for n, (w, o) in after.items()))

    def _check(self, stage: RemoteStage, signed: SignedAttestation, phase: str, step: int,
               sent: dict[int, tuple[str, int]], group: list[str]) -> Attestation:
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
                                   f"{len(sent)} this trainer sent")
        tokens = sum(count for _, count in sent.values())
        if attestation.tokens != tokens:
            raise AttestationError(f"it claims {attestation.tokens} tokens; this trainer sent {tokens}")
        if list(attestation.averaged_with) != group:
            raise AttestationError(f"it says it summed gradients with {list(attestation.averaged_with)}, "
                                   f"not the replica group {group}")
        return attestation
