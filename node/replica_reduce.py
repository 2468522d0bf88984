"""Summing a replica group's adapter gradients before a step, node to node over hivemind P2P.

Each of the R replicas of a block range flattens its accumulated gradient and cuts it into R parts; replica j
owns part j. Every replica sends part j to replica j (encoded with the job's averaging codec), replica j sums
the R contributions in replica order, encodes the sum once and answers every sender with those same bytes,
and decodes them itself. So every replica ends with bit-identical gradients, hence identical AdamW steps and
identical adapter hashes, whatever the codec and whatever order the parts arrived in.

(hivemind's all-reduce returns each peer `own + decode(encode(average - own))` instead: with a lossy codec the
replicas would drift apart by their quantisation errors, so we keep its wire format and codecs but not its
delta scheme.)

The trainer says who is in the group with every step call, and every part names the group it belongs to; a
part that arrives before this node's own step call is held until then (and counts only if the trainer names
the same group). A step retried without a replica that died is a new group, summed afresh.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import runtime_pb2

from swarm.p2p.codecs import codec_type
from swarm.p2p.framing import MAX_FRAME_BYTES
from swarm.p2p.replica_sum import split_parts, sum_contributions, through_codec
from swarm.p2p.rpc import AVERAGE, reply_tensor_count
from swarm.p2p.tensors import aiter_list, from_messages, to_messages
from swarm.proto.blocks_pb2 import CallMeta, CallResult
from swarm.traffic import Traffic

logger = logging.getLogger(__name__)

# Parts may be held for at most this many (step, group) slots this node has not summed yet (a faster replica
# can be a step ahead; a step retried without a dead replica opens a second slot); more is refused, so a
# stranger cannot make the node hold parts for arbitrary steps.
STEPS_AHEAD = 4


class ReduceError(Exception):
    """The group's gradients could not be summed (a replica sent nothing in time, or sent a bad part)."""


@dataclass
class _Part:
    """This node's part of one step's sum within one group: the contributions sent to it and, once all are
    in, the sum. A step retried with a smaller group (a replica died) gets a fresh slot."""

    size: int | None = None
    contributions: dict[int, tuple[PeerID | None, torch.Tensor]] = field(default_factory=dict)
    summed: asyncio.Future | None = None  # -> (serialized runtime_pb2.Tensor, decoded tensor)


@dataclass
class _Group:
    peers: list[PeerID]
    index: int
    codec: int


@dataclass
class ReduceResult:
    gradient: torch.Tensor
    bytes_sent: int
    bytes_received: int


_Key = tuple[int, tuple[PeerID, ...]]  # (step, the group's peers in order)

DIAL_ATTEMPTS = 3  # a replica that cannot be reached this many times in a row is taken for gone


class GradientReducer:
    """Runs on the node's P2P event loop: `reduce` for this node's own step call, `handle` for peers' parts."""

    def __init__(self, job_id: str, block_start: int, block_end: int):
        self.job_id, self.block_start, self.block_end = job_id, block_start, block_end
        self.p2p: P2P | None = None
        self.parts: dict[_Key, _Part] = {}
        self.groups: dict[_Key, _Group] = {}  # the groups the trainer named, by step
        self.last_step = -1  # the last step whose sum this node took (a node joining mid-job: the step before)
        self.handled_bytes: dict[int, Traffic] = {}  # step -> what answering peers' parts moved

    async def reduce(self, step: int, peers: list[PeerID], codec_name: str, gradient: torch.Tensor,
                     timeout: float) -> ReduceResult:
        """Sum `gradient` (flat float32) with the other replicas' for `step`; every replica gets the same sum."""
        me = self.p2p.peer_id
        if me not in peers:
            raise ReduceError(f"the trainer's replica group for step {step} does not include this node")
        key = (step, tuple(peers))
        group = self.groups[key] = _Group(list(peers), peers.index(me), codec_type(codec_name))
        slot = self._slot(key)  # peers' parts in it were checked against this same group on arrival
        pieces = split_parts(gradient, len(peers))
        if slot.size is not None and slot.size != pieces[group.index].numel():
            raise ReduceError(f"a replica sent a part of {slot.size} values for step {step}; "
                              f"this node's part has {pieces[group.index].numel()}")
        self._contribute(key, slot, group.index, None, through_codec(pieces[group.index], group.codec))
        counts = Traffic()

        async def fetch(index: int) -> torch.Tensor:
            if index == group.index:
                _, summed = await slot.summed
                return summed
            return await self._send_part(step, group, index, pieces[index], counts)

        try:
            summed = await asyncio.wait_for(asyncio.gather(*(fetch(i) for i in range(len(peers)))), timeout)
        except asyncio.TimeoutError:
            missing = [str(peers[i]) for i in range(len(peers)) if i != group.index
                       and i not in slot.contributions]  # fmt: skip
            raise ReduceError(f"step {step}: the replica group did not finish summing gradients within {timeout:.0f} s"
                              + (f" (no part from {', '.join(missing)})" if missing else "")) from None
        moved = counts + self.handled_bytes.pop(step, Traffic())
        self._forget_before(step)
        return ReduceResult(torch.cat(summed), moved.sent, moved.received)

    async def _send_part(self, step: int, group: _Group, index: int, piece: torch.Tensor, counts: Traffic
                         ) -> torch.Tensor:
        meta = CallMeta(job_id=self.job_id, block_start=self.block_start, block_end=self.block_end, step=step,
                        part_index=index, sender_index=group.index,
                        replica_peers=[peer.to_base58() for peer in group.peers])
        requests = to_messages(runtime_pb2.ExpertRequest, meta.SerializeToString(), [piece], group.codec)
        sent = sum(message.ByteSize() for message in requests)
        counts.add(sent=sent)
        for attempt in range(1, DIAL_ATTEMPTS + 1):
            try:
                responses = await self.p2p.iterate_protobuf_handler(group.peers[index], AVERAGE, aiter_list(requests),
                                                                    runtime_pb2.ExpertResponse)
                # the reply is the part's sum, as long as the part in the same codec: twice it and a frame at most
                metadata, tensors, received = await from_messages(responses, 2 * sent + MAX_FRAME_BYTES,
                                                                  reply_tensor_count,
                                                                  too_large="the summed part is larger than its limit")
                break
            except ValueError as error:  # a frame or the reply past its limit: not a replica's answer, not retried
                raise ReduceError(f"replica {group.peers[index]} answered part {index} of step {step}: {error}") from None
            except (ConnectionError, asyncio.IncompleteReadError, P2PDaemonError) as error:
                if attempt == DIAL_ATTEMPTS:
                    raise ReduceError(f"replica {group.peers[index]} is unreachable: {error}") from None
                logger.warning("replica %s dropped part %d of step %d (%s); retrying", group.peers[index], index,
                               step, error)
                await asyncio.sleep(0.2 * attempt)
        counts.add(received=received)
        result = CallResult.FromString(metadata)
        if result.status != CallResult.OK:
            raise ReduceError(f"replica {group.peers[index]} refused this node's gradient part: {result.error}")
        if len(tensors) != 1 or tensors[0].numel() != piece.numel():
            raise ReduceError(f"replica {group.peers[index]} answered part {index} of step {step} with the wrong shape")
        return tensors[0].float()

    async def handle(self, meta: CallMeta, tensors: list[torch.Tensor], sender: PeerID, received: int,
                     timeout: float) -> tuple[runtime_pb2.Tensor, int]:
        """A peer's part for this node to sum: held until all parts are in; the reply is the encoded sum."""
        step = meta.step
        key = (step, tuple(PeerID.from_base58(peer) for peer in meta.replica_peers))
        finished = step == self.last_step and key in self.parts  # a peer asking again for a sum it lost
        if step <= self.last_step and not finished:
            raise ValueError(f"gradient part for step {step}; this node already stepped past it ({self.last_step})")
        waiting = {k for k in self.parts if k[0] > self.last_step}
        if key not in waiting and not finished and len(waiting) >= STEPS_AHEAD:
            raise ValueError(f"gradient part for step {step}; this node already holds parts for "
                             f"{len(waiting)} groups of steps {sorted({k[0] for k in waiting})}")
        if len(tensors) != 1 or tensors[0].dim() != 1 or not tensors[0].is_floating_point():
            raise ValueError("a gradient part is one flat floating-point tensor")
        if not torch.isfinite(tensors[0]).all():
            raise ValueError("the gradient part contains NaN or inf")
        peers = key[1]
        if self.p2p.peer_id not in peers or meta.part_index != peers.index(self.p2p.peer_id):
            raise ValueError(f"this node does not sum part {meta.part_index} in the group the part names")
        if not 0 <= meta.sender_index < len(peers) or peers[meta.sender_index] != sender:
            raise PermissionError(f"peer {sender} is not replica {meta.sender_index} of the group the part names")
        slot = self._slot(key)
        if slot.size is not None and slot.size != tensors[0].numel():
            raise ValueError(f"the part has {tensors[0].numel()} values; the others have {slot.size}")
        self.handled_bytes.setdefault(step, Traffic()).add(received=received)
        self._contribute(key, slot, meta.sender_index, sender, tensors[0].float())
        serialized, _ = await asyncio.wait_for(asyncio.shield(slot.summed), timeout)
        self.handled_bytes.setdefault(step, Traffic()).add(sent=serialized.ByteSize())
        return serialized, serialized.ByteSize()

    def start_after(self, step: int) -> None:
        """This node joined the group after `step`: take parts for later steps only."""
        self.reset()
        self.last_step = step

    def reset(self) -> None:
        """Forget every step (the node was restored: steps are redone)."""
        self.parts.clear()
        self.groups.clear()
        self.handled_bytes.clear()
        self.last_step = -1

    def _slot(self, key: _Key) -> _Part:
        slot = self.parts.get(key)
        if slot is None:
            slot = self.parts[key] = _Part(summed=asyncio.get_running_loop().create_future())
        return slot

    def _contribute(self, key: _Key, slot: _Part, sender: int, peer: PeerID | None, tensor: torch.Tensor) -> None:
        if sender in slot.contributions:
            return  # a retried send: the first copy counts
        slot.size = tensor.numel()
        slot.contributions[sender] = (peer, tensor)
        group = self.groups.get(key)
        if group is not None and len(slot.contributions) == len(group.peers) and not slot.summed.done():
            ordered = [slot.contributions[index][1] for index in range(len(group.peers))]
            slot.summed.set_result(sum_contributions(ordered, group.codec))

    def _forget_before(self, step: int) -> None:
        """Drop what older steps held; this step's sums stay, for a peer whose reply got lost."""
        self.last_step = max(self.last_step, step)
        for old in [k for k in self.parts if k[0] < step]:
            del self.parts[old]
        for old in [k for k in self.groups if k[0] < step]:
            del self.groups[old]
        for old in [s for s in self.handled_bytes if s < step]:
            del self.handled_bytes[old]

