"""Codecs for tensors on the wire, chosen by name per stream in job.yaml (`compression.forward`, `.backward`).

Volunteer links are slow, so bytes are the cost: float16 halves them, hivemind's 8-bit codecs quarter them.
Only floating-point activations and gradients are encoded; masks and position ids always travel exactly.
Decoding needs no name: a serialized tensor carries its codec.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

# hivemind's 8-bit codecs use torch.quantize_per_tensor, which torch 2.13 marks deprecated on every call.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)

_TYPES = runtime_pb2.CompressionType
CODECS: dict[str, int] = {
    "none": _TYPES.NONE,  # float32 as computed
    "float16": _TYPES.FLOAT16,
    "meanstd16": _TYPES.MEANSTD_16BIT,  # float16 after normalizing by mean and std
    "uniform8bit": _TYPES.UNIFORM_8BIT,
    "quantile8bit": _TYPES.QUANTILE_8BIT,
    "blockwise8bit": _TYPES.BLOCKWISE_8BIT,  # needs bitsandbytes
}
_NEEDS = {"blockwise8bit": "bitsandbytes"}


def codec_type(name: str) -> int:
    """The hivemind compression type of a codec name; ValueError naming the valid ones otherwise."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
    needed = _NEEDS.get(name)
    if needed and importlib.util.find_spec(needed) is None:
        raise ValueError(f"codec {name!r} needs the {needed} package, which is not installed here")
    return CODECS[name]


def wire_type(tensor: torch.Tensor, codec: int) -> int:
    """The codec a tensor actually travels with: integer tensors (masks, ids) are never quantized, and nor is an
    empty one (the first range's unused input gradient), which hivemind's 8-bit codecs cannot encode."""
    return codec if tensor.is_floating_point() and tensor.numel() else _TYPES.NONE


def round_trip(tensor: torch.Tensor, codec: int) -> torch.Tensor:
    """The tensor exactly as a peer decodes it after this codec (the identity for `none`)."""
    if wire_type(tensor, codec) == _TYPES.NONE:
        return tensor
    return deserialize_torch_tensor(serialize_torch_tensor(tensor.detach().cpu(), codec)).to(tensor.dtype)
