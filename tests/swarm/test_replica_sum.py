"""The group sum replicas agree on: exact in fp32 up to float addition, the same bytes for every replica."""

import torch

from swarm.p2p.codecs import CODECS
from swarm.p2p.replica_sum import group_sum, split_parts, sum_contributions, through_codec


def gradients(count: int, size: int = 1001) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=generator) for _ in range(count)]


def test_fp32_group_sum_is_the_plain_sum():
    grads = gradients(3)
    assert torch.allclose(group_sum(grads, CODECS["none"]), grads[0] + grads[1] + grads[2], atol=1e-6)
    assert [len(part) for part in split_parts(grads[0], 3)] == [334, 334, 333]


def test_8bit_group_sum_stays_close_and_every_replica_decodes_the_same_bytes():
    grads = gradients(2)
    summed = group_sum(grads, CODECS["uniform8bit"])
    exact = grads[0] + grads[1]
    assert (summed - exact).norm() / exact.norm() < 0.05 and not torch.equal(summed, exact)
    contributions = [through_codec(g[:100], CODECS["uniform8bit"]) for g in grads]
    first, second = sum_contributions(contributions, CODECS["uniform8bit"]), sum_contributions(contributions, CODECS["uniform8bit"])
    assert first[0].SerializeToString() == second[0].SerializeToString() and torch.equal(first[1], second[1])
