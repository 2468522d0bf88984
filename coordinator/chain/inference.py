"""Generation with the keys and values kept on the nodes: an inference session per generation batch.

Each range's replica keeps its blocks' past keys and values for the session (node.inference_sessions), so a
new token travels the chain as one position. The trainer keeps every range's inputs so far (it relays them
anyway), so a replica that lost the session (evicted, restarted, or replaced by another replica after a failed
call) is refilled with the whole prefix and answers as if it had never lost it.
"""

from __future__ import annotations

import logging
import uuid

import torch

from coordinator.chain.routing import Router
from coordinator.chain.transport import Transport, hidden_reply
from swarm.config import CompressionSpec
from swarm.errors import SwarmConnectionError
from swarm.p2p.codecs import codec_type
from swarm.p2p.rpc import END_SESSION, INFER
from swarm.proto.blocks_pb2 import CallResult

logger = logging.getLogger("swarm.coordinator")


class InferenceSession:
    """One generation batch over one replica per range; use as a context manager (it frees the nodes' caches
    and releases the route when done)."""

    def __init__(self, transport: Transport, router: Router, compression: CompressionSpec, phase: str, step: int):
        self.transport, self.router = transport, router
        self.reply_codec = compression.forward
        self.codec = codec_type(compression.forward)
        self.phase, self.step = phase, step
        self.session_id = uuid.uuid4().hex
        self.route = router.route()
        self._pieces: list[list[torch.Tensor]] = [[] for _ in self.route]  # each range's input, a piece a call
        self.held = [0] * len(self.route)  # positions each range's replica keeps for the session
        self.position_ids: torch.Tensor | None = None
        self.refills = 0  # calls that had to re-send a prefix a replica no longer held

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        """The chain's output for `hidden`, the positions after those already sent; `attention_mask` covers
        every position so far, `position_ids` the new ones."""
        self.position_ids = position_ids if self.position_ids is None else torch.cat([self.position_ids, position_ids], 1)
        if self.position_ids.shape != attention_mask.shape:
            raise ValueError(f"the attention mask covers {attention_mask.shape[1]} positions, "
                             f"the session {self.position_ids.shape[1]}")
        new = hidden.shape[1]
        for index in range(len(self.route)):
            pieces = self._pieces[index]
            pieces.append(hidden if not pieces else hidden.to(pieces[0].dtype))
            hidden = self._forward_one(index, attention_mask)[:, -new:]
        return hidden

    @property
    def inputs(self) -> list[torch.Tensor | None]:
        """Each range's input so far, every position (None for a range not called yet)."""
        return [torch.cat(pieces, 1) if pieces else None for pieces in self._pieces]

    def _input_after(self, index: int, held: int) -> torch.Tensor:
        """Range `index`'s input after the first `held` positions: the newest piece alone when the replica holds
        all before it (every step but a refill). Joining every step instead copied the whole prefix, once per
        range, for every new token: a cost that grows with the answer."""
        pieces = self._pieces[index]
        if held == sum(piece.shape[1] for piece in pieces[:-1]):
            return pieces[-1]
        joined = torch.cat(pieces, 1)
        self._pieces[index] = [joined]  # one piece from here on: the next step's newest piece follows it
        return joined[:, held:]

    def _forward_one(self, index: int, attention_mask: torch.Tensor) -> torch.Tensor:
        while True:
            stage, held = self.route[index], self.held[index]
            meta = self.transport.meta(stage, phase=self.phase, step=self.step, session_id=self.session_id,
                                       session_length=held, reply_codec=self.reply_codec)
            tensors = [self._input_after(index, held), attention_mask, self.position_ids[:, held:]]
            try:
                result, outputs = self.transport.call(stage, INFER, meta, tensors, self.codec)
                if result.status == CallResult.OK:
                    output = hidden_reply(stage, INFER, outputs, tensors[0].shape)
            except SwarmConnectionError as error:
                self.route[index] = self.router.replace(index, stage, str(error))
                self.held[index] = 0
                logger.warning("generation session goes to %s instead of %s", self.route[index], stage)
                continue
            if result.status == CallResult.MISSING_SESSION:
                if held == 0:  # cannot happen with an honest node: it never needs a session to start one
                    raise SwarmConnectionError(f"{stage} refused to start an inference session: {result.error}")
                logger.info("%s lost inference session (%s); re-sending its %d positions", stage, result.error, held)
                self.held[index] = 0
                self.refills += 1
                continue
            self.held[index] = result.session_length
            return output

    def close(self) -> None:
        """Free the session on every replica that keeps it (best effort: a node also drops idle sessions)."""
        for index, stage in enumerate(self.route):
            if self.held[index]:
                try:
                    self.transport.call(stage, END_SESSION, self.transport.meta(stage, session_id=self.session_id))
                except SwarmConnectionError as error:
                    logger.info("%s did not free inference session %s: %s", stage, self.session_id, error)
                self.held[index] = 0
        self.router.release(self.route)

