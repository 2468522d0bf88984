"""One block range of a replayed step (swarm.audit.replay): its blocks built once for all its replicas, and
each replica's own gradient added up the way the node added it."""

from __future__ import annotations

import torch

from swarm.audit.attestation import Attestation
from swarm.audit.snapshot import NodeStepState
from swarm.models.checkpoint import tensors_sha256


class RangeReplay:
    """One block range of a replayed step: its blocks, built once for all its replicas, and each replica's own
    gradient, accumulated from the micro-batches that replica attested (a node that stepped alone: all of them).

    Replicas start a step from identical weights unless one cheated; each micro-batch runs through the weights
    of the replica that attested it, so a replica that drifted is replayed on its own weights, and the blocks
    are reloaded only when the weights a micro-batch needs differ from the ones they hold.

    A replica's micro-batches are added up in the order its attestation lists them: float addition is not
    associative, so that is what makes a replica that took three or more of them replay bit for bit, as far as
    the node lists them in the order it accumulated them. A micro-batch whose turn has not come is kept
    aside until it has.
    """

    def __init__(self, start: int, end: int, nodes: list[NodeStepState], stack: torch.nn.Module,
                 trained: dict[str, torch.nn.Parameter], attested: dict[str, Attestation | None],
                 attestations: dict[tuple[str, int], Attestation], step: int):
        self.start, self.end, self.nodes, self.stack, self.trained = start, end, nodes, stack, trained
        self.attested = attested
        # The replicas whose own gradients the group sums: the snapshot's nodes and any node their
        # attestations name (the log's verification makes those the same set; this stays safe if not).
        self.members = [node.node_id for node in nodes]
        for attestation in attested.values():
            for member in attestation.averaged_with if attestation else ():
                if member not in self.members:
                    self.members.append(member)
        grouped = any(a is not None and a.averaged_with for a in attested.values())
        # node id -> the micro-batch ids it attested, in its order; None: every micro-batch, as they come
        self.order: dict[str, list[int] | None] = {}
        for member in self.members:
            attestation = attestations.get((member, step))
            batches = attestation.micro_batches if attestation else ()
            self.order[member] = [batch.id for batch in batches] if grouped else None
        self.added = {member: 0 for member in self.members}  # how many of its `order` are in its gradient
        self.waiting: dict[int, dict[str, torch.Tensor]] = {}  # micro-batch id -> gradients not yet added
        self.states = {node.node_id: node for node in nodes}
        self.weights_sha256 = {node.node_id: tensors_sha256(node.weights("before")) for node in nodes}
        self.loaded: str | None = None  # SHA-256 of the weights the blocks hold now
        self.gradients: dict[str, dict[str, torch.Tensor]] = {member: {} for member in self.members}

    def load_weights_for(self, micro_batch: int) -> None:
        """Give the blocks the weights of the replica that attested `micro_batch` (else the range's first)."""
        node = next((member for member in self.members if member in self.states
                     and self._claimed(member, micro_batch)), self.nodes[0].node_id)
        if self.weights_sha256[node] == self.loaded:
            return
        before = self.states[node].weights("before")
        with torch.no_grad():
            for name, param in self.trained.items():
                param.copy_(before[name].to(param.dtype))
        self.loaded = self.weights_sha256[node]

    def collect_gradients(self, micro_batch: int) -> None:
        """Take the blocks' gradients of `micro_batch` (clearing them) for the replicas that attested it."""
        grads = {name: param.grad for name, param in self.trained.items() if param.grad is not None}
        for param in self.trained.values():
            param.grad = None
        self.waiting[micro_batch] = grads
        for member, order in self.order.items():
            if order is None:
                self._add(member, grads)
            else:
                while self.added[member] < len(order) and order[self.added[member]] in self.waiting:
                    self._add(member, self.waiting[order[self.added[member]]])
                    self.added[member] += 1
        still_needed = {m for member, order in self.order.items() if order for m in order[self.added[member]:]}
        self.waiting = {m: grads for m, grads in self.waiting.items() if m in still_needed}

    def gradient(self, member: str) -> dict[str, torch.Tensor]:
        """The member's own gradient once every micro-batch ran; zeros for what none of its micro-batches
        reached (as on the node). Micro-batch ids the step does not have add nothing."""
        order = self.order[member] or []
        for micro_batch in order[self.added[member]:]:
            if micro_batch in self.waiting:
                self._add(member, self.waiting[micro_batch])
        self.added[member] = len(order)
        own = self.gradients[member]
        return {name: own[name] if name in own else torch.zeros_like(param) for name, param in self.trained.items()}

    def _add(self, member: str, grads: dict[str, torch.Tensor]) -> None:
        """As autograd accumulates on a node: the first micro-batch's gradient as it is, then in-place sums."""
        own = self.gradients[member]
        for name, grad in grads.items():
            if name in own:
                own[name] += grad
            else:
                own[name] = grad.clone()

    def _claimed(self, member: str, micro_batch: int) -> bool:
        order = self.order[member]
        return order is None or micro_batch in order
