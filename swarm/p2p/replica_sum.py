"""The sum a replica group's gradients reduce to, defined once for the nodes that compute it and for replay.

Replica i's flat gradient is cut into R parts (`torch.tensor_split`); part j of every replica goes, through
the averaging codec, to replica j, which adds the R decoded contributions in replica order and encodes the
sum once; every replica decodes those same bytes. `group_sum` runs the whole exchange on one machine.
"""

from __future__ import annotations

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2


def flatten_gradient(gradient: dict[str, torch.Tensor]) -> torch.Tensor:
    """A replica's gradient as it enters the group's sum: float32 on the CPU, tensors in name order."""
    return torch.cat([gradient[name].detach().float().cpu().flatten() for name in sorted(gradient)])


def unflatten_gradient(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `flatten_gradient`: tensors shaped like `like`'s."""
    if flat.numel() != sum(t.numel() for t in like.values()):
        raise ValueError(f"the summed gradient has {flat.numel()} values, not {sum(t.numel() for t in like.values())}")
    out, offset = {}, 0
    for name in sorted(like):
        count = like[name].numel()
        out[name] = flat[offset:offset + count].view(like[name].shape)
        offset += count
    return out


def through_codec(tensor: torch.Tensor, codec: int) -> torch.Tensor:
    """A gradient part exactly as its receiver decodes it."""
    return deserialize_torch_tensor(serialize_torch_tensor(tensor.float().contiguous(), codec)).float()


def sum_contributions(contributions: list[torch.Tensor], codec: int) -> tuple[runtime_pb2.Tensor, torch.Tensor]:
    """One part's sum over the replicas, added in replica order: the bytes every replica receives, decoded."""
    total = contributions[0].clone()
    for contribution in contributions[1:]:
        total += contribution
    serialized = serialize_torch_tensor(total, codec)
    return serialized, deserialize_torch_tensor(serialized).float()


def split_parts(gradient: torch.Tensor, replicas: int) -> list[torch.Tensor]:
    return list(torch.tensor_split(gradient.float().contiguous(), replicas))


def group_sum(gradients: list[torch.Tensor], codec: int) -> torch.Tensor:
    """What every replica ends with, from the replicas' flat gradients in group order."""
    parts = [split_parts(gradient, len(gradients)) for gradient in gradients]
    summed = [sum_contributions([through_codec(own[j], codec) for own in parts], codec)[1]
              for j in range(len(gradients))]
    return torch.cat(summed)
