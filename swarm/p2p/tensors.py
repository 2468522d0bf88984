"""Tensors on the wire: hivemind serialization, chunked into a stream of hivemind runtime messages.

A call is a stream of `ExpertRequest` (a reply, of `ExpertResponse`) messages, each carrying one chunk of one
serialized tensor; the first message also carries our protobuf metadata (CallMeta or CallResult). Chunking
keeps every message below libp2p's frame limit whatever the activation size.

A tensor that travels as is (codec `none`, not bfloat16) and fits one chunk is written straight into its message,
and a one-chunk tensor is read straight from its part: the same bytes as hivemind's serialize-then-split and
combine-then-deserialize, without the copies they make of the whole buffer (a 0.79 MB tensor, the main job's
hidden states, in one process: 0.28-0.90 ms into its message and 0.17 ms out of it, against 0.06 and 0.06 ms;
docs/BENCHMARKS.md, "The direct data channel").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from swarm.p2p.codecs import wire_type

CHUNK_BYTES = 1 << 20


def to_messages(message_type, metadata: bytes, tensors: Sequence[torch.Tensor],
                codecs: int | Sequence[int] = runtime_pb2.CompressionType.NONE) -> list:
    """`codecs`: one hivemind compression type for all tensors, or one per tensor (see swarm.p2p.codecs)."""
    if isinstance(codecs, int):
        codecs = [codecs] * len(tensors)
    messages = []
    for tensor, codec in zip(tensors, codecs):
        tensor = tensor.detach().cpu()
        wire = wire_type(tensor, codec)
        if _travels_raw(tensor, wire):
            message = message_type()
            # hivemind's NoCompression part, chunk count included (0 for an empty tensor, as its split gives)
            message.tensors.add(compression=wire, buffer=tensor.numpy().tobytes(), chunks=1 if tensor.numel() else 0,
                                size=tensor.shape, dtype=str(tensor.dtype).removeprefix("torch."),
                                requires_grad=tensor.requires_grad)
            messages.append(message)
            continue
        for part in split_for_streaming(serialize_torch_tensor(tensor, wire), CHUNK_BYTES):
            messages.append(message_type(tensors=[part]))
    messages = messages or [message_type()]
    messages[0].metadata = metadata
    return messages


def _travels_raw(tensor: torch.Tensor, wire: int) -> bool:
    """Whether hivemind would send `tensor` as its raw bytes in a single chunk (bfloat16 it converts first)."""
    return (wire == runtime_pb2.CompressionType.NONE and tensor.dtype != torch.bfloat16
            and tensor.numel() * tensor.element_size() <= CHUNK_BYTES)


def combine_parts(parts: Iterable[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    parts = iter(parts)
    tensors = []
    for first in parts:
        chunk_count = max(first.chunks, 1)
        if chunk_count == 1:  # already whole: combining would copy its buffer twice for nothing
            tensors.append(deserialize_torch_tensor(first))
            continue
        chunks = [first] + [next(parts) for _ in range(chunk_count - 1)]
        tensors.append(deserialize_torch_tensor(combine_from_streaming(chunks)))
    return tensors


class WholeTensors:
    """Counts, message by message, the whole tensors a stream has delivered (a tensor's first part says how many
    chunks it has)."""

    def __init__(self):
        self.complete = 0
        self._owed = 0  # chunks still to come of the tensor being read

    def add(self, message) -> int:
        for part in message.tensors:
            if self._owed == 0:
                self._owed = max(part.chunks, 1)
            self._owed -= 1
            if self._owed == 0:
                self.complete += 1
        return self.complete


async def from_messages(stream: AsyncIterator, max_bytes: int | None = None,
                        tensor_count: Callable[[bytes], int] | None = None,
                        too_large: str = "request larger than this node's limit"
                        ) -> tuple[bytes, list[torch.Tensor], int]:
    """Collect a message stream into (metadata, tensors, bytes received); ValueError past `max_bytes`, its
    message starting with `too_large`.

    With `tensor_count` (the count the metadata announces), reading stops at the last part of the last
    tensor and the stream is closed from this side, instead of waiting for the sender to close it."""
    metadata, parts, received, expected = None, [], 0, None
    whole = WholeTensors()
    async for message in stream:
        received += message.ByteSize()
        if max_bytes is not None and received > max_bytes:
            raise ValueError(f"{too_large} of {max_bytes} bytes; refused")
        if metadata is None:
            metadata = message.metadata
            expected = tensor_count(metadata) if tensor_count is not None else None
        parts.extend(message.tensors)
        complete = whole.add(message)
        if expected is not None and complete >= expected:
            await stream.aclose()
            break
    if metadata is None:
        raise ConnectionError("the peer closed the stream without answering (is the node still running?)")
    try:
        return metadata, combine_parts(parts), received
    except StopIteration:
        raise ConnectionError("the stream ended inside a tensor (connection lost mid-reply)") from None


async def aiter_list(items: list) -> AsyncIterator:
    for item in items:
        yield item
