"""Codecs on the wire: names, what each does to a tensor's bytes and values, and what is never quantized."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.config import parse_job
from swarm.p2p.codecs import CODECS, codec_type, round_trip
from swarm.p2p.tensors import combine_parts, to_messages
from tests.conftest import job_dict


def wire_bytes(tensors, codec) -> int:
    return sum(m.ByteSize() for m in to_messages(runtime_pb2.ExpertRequest, b"", tensors, codec))


def decoded(tensors, codec) -> list[torch.Tensor]:
    messages = to_messages(runtime_pb2.ExpertRequest, b"", tensors, codec)
    return combine_parts(part for message in messages for part in message.tensors)


def test_an_unknown_codec_name_is_refused_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown codec 'int4'; valid codecs: none, float16, .*uniform8bit"):
        codec_type("int4")


def test_a_job_with_an_unknown_codec_is_refused_naming_the_field():
    with pytest.raises(Exception, match="compression.backward: unknown codec 'fp8'"):
        parse_job(job_dict(compression={"forward": "float16", "backward": "fp8"}))


@pytest.mark.parametrize(("name", "min_ratio", "max_error"), [
    ("none", 1.0, 0.0), ("float16", 1.99, 1e-3), ("uniform8bit", 3.9, 0.05), ("quantile8bit", 3.9, 0.05)])
def test_each_codec_cuts_bytes_and_keeps_values_close(name, min_ratio, max_error):
    hidden = torch.randn(4, 96, 128, generator=torch.Generator().manual_seed(0))
    codec = codec_type(name)
    ratio = wire_bytes([hidden], CODECS["none"]) / wire_bytes([hidden], codec)
    (back,) = decoded([hidden], codec)
    error = float((back - hidden).norm() / hidden.norm())
    assert ratio >= min_ratio and error <= max_error
    assert torch.equal(back, round_trip(hidden, codec))  # the trainer can compute what the node will decode


def test_masks_and_position_ids_travel_exactly_whatever_the_codec():
    mask = torch.ones(4, 96, dtype=torch.long)
    mask[:, 50:] = 0
    positions = torch.arange(96).expand(4, 96).contiguous()
    hidden = torch.randn(4, 96, 16)
    back = decoded([hidden, mask, positions], codec_type("uniform8bit"))
    assert torch.equal(back[1], mask) and torch.equal(back[2], positions)
    assert not torch.equal(back[0], hidden)  # the activations were quantized


def test_per_tensor_codecs_encode_each_tensor_with_its_own():
    grad, hidden = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    back = decoded([grad, hidden], [codec_type("none"), codec_type("float16")])
    assert torch.equal(back[0], grad) and not torch.equal(back[1], hidden)


@pytest.mark.parametrize("name", ["float16", "uniform8bit", "quantile8bit"])
def test_an_empty_tensor_travels_whatever_the_codec(name):
    (back,) = decoded([torch.empty(0)], codec_type(name))  # the first range's unused input gradient
    assert back.shape == (0,) and back.dtype == torch.float32
