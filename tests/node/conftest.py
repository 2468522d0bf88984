"""Shards on a tiny checkpoint, and the random micro-batches they are fed (seeded by tests.conftest.random_seed)."""

from __future__ import annotations

import pytest
import torch

from node.shard import Shard
from swarm.config import LoraSpec, OptimizerSpec
from swarm.models.checkpoint import Checkpoint
from tests.conftest import random_seed, save_tiny_checkpoint

START, END = 1, 3  # the range every test shard serves, of the tiny checkpoint's 4 blocks
HIDDEN = 32  # save_tiny_checkpoint's hidden size


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Checkpoint:
    return Checkpoint.open(save_tiny_checkpoint(tmp_path_factory.mktemp("node-checkpoint") / "llama"))


@pytest.fixture
def make_shard(checkpoint):
    """Shards that start alike: the same blocks, LoRA seed and optimizer settings."""
    def make(dishonest: str | None = None) -> Shard:
        return Shard(checkpoint, START, END, LoraSpec(r=4, alpha=8), OptimizerSpec(lr=0.01), 0, torch.float32,
                     torch.device("cpu"), dishonest)

    return make


@pytest.fixture
def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(random_seed(request.node.name))


def micro_batch(generator: torch.Generator, batch: int = 2, length: int = 6) -> list[torch.Tensor]:
    """Hidden states, attention mask (the last row right-padded) and position ids, as a forward call takes them."""
    hidden = torch.randn(batch, length, HIDDEN, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    positions = torch.arange(length).unsqueeze(0).expand(batch, length).contiguous()
    return [hidden, mask, positions]


def output_gradient(generator: torch.Generator, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randn(batch, length, HIDDEN, generator=generator)


def train_micro_batch(shard: Shard, step: int, micro: int, inputs: list[torch.Tensor], grad: torch.Tensor
                      ) -> torch.Tensor:
    """One micro-batch's forward and backward on `shard`; returns the gradient w.r.t. its input."""
    shard.forward(step, micro, True, *inputs)
    return shard.backward(step, micro, grad, None)


def train_step(shard: Shard, step: int, generator: torch.Generator, learning_rate: float = 0.01):
    """One random micro-batch's forward and backward, then the step; returns the step's StepWork."""
    train_micro_batch(shard, step, 0, micro_batch(generator), output_gradient(generator))
    return shard.apply_step(step, learning_rate)
