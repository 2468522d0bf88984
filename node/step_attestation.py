"""A node's answer to a step call: apply the update (summing gradients with the range's other replicas first, when
the trainer names a group) and sign an `Attestation` of the work actually done.

The bytes an attestation states are those of the step's training calls (forward with `train`, backward, and the
step request itself; the step's reply, which carries the attestation, cannot count itself) plus what summing the
gradients with the replicas moved. A retried step call gets the same signed bytes again.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import PeerID

from node.replica_reduce import GradientReducer
from node.shard import Shard
from swarm.audit.attestation import Attestation, MicroBatch, SignedAttestation, replica_group, sign_attestation
from swarm.identity import Identity
from swarm.proto.blocks_pb2 import CallMeta
from swarm.traffic import Traffic

logger = logging.getLogger(__name__)


class StepAttestation:
    """Applies steps to `shard` and attests them as `identity`; keeps what the next attestation needs."""

    def __init__(self, shard: Shard, job_id: str, identity: Identity, reducer: GradientReducer):
        self.shard, self.job_id, self.identity, self.reducer = shard, job_id, identity, reducer
        self.step_bytes: dict[int, Traffic] = {}  # step id -> what its training calls moved
        self.averaging_bytes = Traffic()  # what summing the last step's gradients with the replicas moved
        self.last: tuple[Attestation, SignedAttestation] | None = None

    def traffic_of(self, step: int) -> Traffic:
        """The running count of what step `step`'s training calls moved."""
        return self.step_bytes.setdefault(step, Traffic())

    def forget(self) -> None:
        """The shard's state was replaced (a restore, a replica's or a checkpoint's state): steps are redone."""
        self.last = None
        self.step_bytes.clear()

    def answer(self, meta: CallMeta, loop: asyncio.AbstractEventLoop) -> tuple[Attestation, SignedAttestation]:
        """Step `meta.step` applied and attested, or, for a retried call of the last step, its attestation
        again; `loop` runs the gradient reducer."""
        if not meta.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {meta.learning_rate}")
        if self.last is None or self.last[0].step != meta.step:
            self.last = self._apply_and_attest(meta, loop)
        return self.last

    def _apply_and_attest(self, meta: CallMeta, loop: asyncio.AbstractEventLoop
                          ) -> tuple[Attestation, SignedAttestation]:
        shard = self.shard
        if shard.phase_name and meta.phase != shard.phase_name:
            raise ValueError(f"step {meta.step} is for phase {meta.phase!r}; this node is in {shard.phase_name!r}")
        group, averaged = list(meta.replica_nodes), Traffic()
        if len(meta.replica_peers) > 1:
            if len(group) != len(meta.replica_peers) or self.identity.fingerprint not in group:
                raise ValueError("the replica group must name one node per peer, this node among them")
            peers = [PeerID.from_base58(peer) for peer in meta.replica_peers]
            timeout = meta.averaging_timeout_s or 60.0

            def reduce(gradient):
                future = asyncio.run_coroutine_threadsafe(
                    self.reducer.reduce(meta.step, peers, meta.averaging_codec or "none", gradient, timeout), loop)
                result = future.result()
                averaged.sent, averaged.received = result.bytes_sent, result.bytes_received
                return result.gradient
        else:
            group, reduce = [], None
        work = shard.apply_step(meta.step, meta.learning_rate, reduce)
        if work is None:
            raise ValueError(f"step {meta.step} is older than the last applied step {shard.last_applied_step}")
        moved = self.step_bytes.pop(meta.step, Traffic()) + averaged
        for step in [step for step in self.step_bytes if step < meta.step]:
            del self.step_bytes[step]
        attestation = Attestation(
            job_id=self.job_id, phase=meta.phase, step=meta.step, block_start=shard.start, block_end=shard.end,
            replica_group=replica_group(shard.start, shard.end), node_id=self.identity.fingerprint,
            micro_batches=tuple(MicroBatch(index, digest) for index, digest in work.micro_batches.items()),
            adapter_sha256_before=work.weights_sha256_before, adapter_sha256_after=work.weights_sha256_after,
            optimizer_sha256_before=work.optimizer_sha256_before, optimizer_sha256_after=work.optimizer_sha256_after,
            gradient_sketch=tuple(work.gradient_sketch), tokens=work.tokens, compute_seconds=work.compute_seconds,
            bytes_sent=moved.sent, bytes_received=moved.received, averaged_with=tuple(group),
            local_gradient_sketch=tuple(work.local_gradient_sketch),
        )
        self.averaging_bytes = averaged
        logger.debug("step %d applied and attested", meta.step)
        return attestation, sign_attestation(attestation, self.identity)
