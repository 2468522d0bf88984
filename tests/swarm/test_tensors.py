"""Tensors on the wire (swarm.p2p.tensors): the messages are hivemind's, byte for byte, and read back exactly."""

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from swarm.p2p.codecs import CODECS, wire_type
from swarm.p2p.tensors import CHUNK_BYTES, combine_parts, to_messages
from tests.conftest import random_seed


def hivemind_messages(metadata: bytes, tensors, codec: int) -> list[bytes]:
    """What hivemind's own serialize-then-split writes for these tensors, one serialized message per chunk."""
    parts = [part for tensor in tensors
             for part in split_for_streaming(serialize_torch_tensor(tensor.detach().cpu(), wire_type(tensor, codec)),
                                             CHUNK_BYTES)]
    messages = [runtime_pb2.ExpertRequest(tensors=[part]) for part in parts] or [runtime_pb2.ExpertRequest()]
    messages[0].metadata = metadata
    return [message.SerializeToString() for message in messages]


def sample_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(random_seed("tensors on the wire"))
    return [
        torch.randn(8, 96, 256, generator=generator),  # the main job's hidden states, one chunk
        torch.randn(CHUNK_BYTES // 4, generator=generator),  # exactly one chunk
        torch.randn(CHUNK_BYTES // 4 + 1, generator=generator),  # one value into a second chunk
        torch.randn(3, CHUNK_BYTES // 4, generator=generator),  # three chunks
        torch.ones(8, 128, dtype=torch.long),  # a mask
        torch.arange(128).expand(8, 128),  # position ids, a view that is not contiguous
        torch.randn(6, 4, generator=generator).t(),  # a transposed view
        torch.empty(0),  # the first range's unused input gradient
        torch.randn(3, 4, generator=generator, requires_grad=True),
        torch.randn(5, generator=generator).half(),
        torch.randn(5, generator=generator).bfloat16(),  # hivemind converts these; it keeps its own path
        torch.randn(2, 3, generator=generator, dtype=torch.float64),
        torch.tensor([True, False, True]),
    ]


@pytest.mark.parametrize("codec", ["none", "float16", "uniform8bit"])
def test_messages_are_the_bytes_hivemind_writes(codec):
    for tensor in sample_tensors():
        if codec == "float16" and tensor.dtype == torch.bfloat16:
            continue  # hivemind's float16 codec refuses bfloat16, and so does to_messages
        ours = [m.SerializeToString() for m in to_messages(runtime_pb2.ExpertRequest, b"meta", [tensor], CODECS[codec])]
        assert ours == hivemind_messages(b"meta", [tensor], CODECS[codec]), (tuple(tensor.shape), tensor.dtype)
    tensors = sample_tensors()
    ours = [m.SerializeToString() for m in to_messages(runtime_pb2.ExpertRequest, b"m", tensors, CODECS["none"])]
    assert ours == hivemind_messages(b"m", tensors, CODECS["none"])


def test_parts_read_back_exactly_and_as_hivemind_reads_them():
    tensors = sample_tensors()
    messages = [runtime_pb2.ExpertRequest.FromString(m.SerializeToString())
                for m in to_messages(runtime_pb2.ExpertRequest, b"", tensors)]
    parts = [part for message in messages for part in message.tensors]
    ours = combine_parts(parts)
    # hivemind's own reading: combine every tensor's chunks, then deserialize
    theirs, position = [], 0
    while position < len(parts):
        count = max(parts[position].chunks, 1)
        theirs.append(deserialize_torch_tensor(combine_from_streaming(parts[position:position + count])))
        position += count
    assert len(ours) == len(theirs) == len(tensors)
    for sent, read, hivemind_read in zip(tensors, ours, theirs):
        assert read.dtype == hivemind_read.dtype and read.shape == sent.shape and not read.requires_grad
        assert torch.equal(read, hivemind_read)
        assert torch.equal(read.to(sent.dtype), sent.detach())  # bfloat16 comes back float32, the same values
    ours[0].add_(1.0)  # a tensor read from a message is its own memory, writable
    assert not torch.equal(ours[0], tensors[0])
