"""The research-only lies (`swarm-node join --dishonest MODE`): each changes what it should in a step, nothing else."""

from __future__ import annotations

import pytest
import torch

from node import cli
from node.dishonest import DISHONEST_MODES, HIDDEN_UPDATE_SIZE
from swarm.audit.sketch import gradient_sketch
from swarm.lora import adapter_state
from swarm.training import make_optimizer
from tests.node.conftest import micro_batch, output_gradient, train_micro_batch


def same_step(shards, generator):
    """The same micro-batch and step 0 on each shard; their StepWorks."""
    inputs, grad = micro_batch(generator), output_gradient(generator)
    works = []
    for shard in shards:
        train_micro_batch(shard, 0, 0, inputs, grad)
        works.append(shard.apply_step(0, 0.01))
    return works


def test_hidden_update_nudges_the_trained_weights_and_attests_the_nudged_ones(make_shard, generator):
    honest, liar = make_shard(), make_shard("hidden-update")
    told, lied = same_step([honest, liar], generator)
    assert lied.gradient_sketch == told.gradient_sketch
    assert lied.weights_sha256_after != told.weights_sha256_after
    assert lied.weights_sha256_after == liar.state_hashes()[0]  # its hash chain stays consistent
    honest_adapter, liar_adapter = honest.adapter(), liar.adapter()
    for name, value in liar_adapter.items():
        nudge = (value - honest_adapter[name]).abs()
        if ".lora_A." in name:
            assert not nudge.any(), name
        else:
            assert torch.allclose(nudge, torch.full_like(nudge, HIDDEN_UPDATE_SIZE), atol=1e-6), name


def test_wrong_sketch_applies_the_true_gradient_but_reports_another(make_shard, generator):
    honest, liar = make_shard(), make_shard("wrong-sketch")
    told, lied = same_step([honest, liar], generator)
    assert liar.state_hashes() == honest.state_hashes()
    assert (lied.weights_sha256_after, lied.optimizer_sha256_after) == (told.weights_sha256_after,
                                                                         told.optimizer_sha256_after)
    assert lied.gradient_sketch != told.gradient_sketch
    assert lied.local_gradient_sketch == lied.gradient_sketch  # alone, the local sketch is the reported one


def test_wrong_sketch_in_a_replica_group_lies_about_the_sum_only(make_shard, generator):
    honest, liar = make_shard(), make_shard("wrong-sketch")
    inputs, grad = micro_batch(generator), output_gradient(generator)
    works = []
    for shard in (honest, liar):
        train_micro_batch(shard, 0, 0, inputs, grad)
        works.append(shard.apply_step(0, 0.01, reduce=lambda flat: flat * 2))
    told, lied = works
    assert lied.local_gradient_sketch == told.local_gradient_sketch
    assert lied.gradient_sketch != told.gradient_sketch
    assert liar.state_hashes() == honest.state_hashes()


def test_an_honest_step_is_plain_adamw_on_the_true_gradient_and_reports_its_sketch(make_shard, generator):
    shard = make_shard()
    train_micro_batch(shard, 0, 0, micro_batch(generator), output_gradient(generator))
    reference = {name: param.detach().clone().requires_grad_() for name, param in adapter_state(shard.blocks).items()}
    for name, param in adapter_state(shard.blocks).items():
        reference[name].grad = param.grad.clone()
    true_sketch = gradient_sketch({name: param.grad for name, param in reference.items()}, shard.sketch_seed)
    make_optimizer(list(reference.values()), shard.optimizer_spec).step()
    work = shard.apply_step(0, shard.optimizer_spec.lr)
    assert work.gradient_sketch == work.local_gradient_sketch == true_sketch
    assert all(torch.equal(reference[name], value) for name, value in shard.adapter().items())


def test_an_unknown_mode_is_refused_with_the_modes_there_are(make_shard):
    with pytest.raises(ValueError, match="unknown dishonest mode 'lazy'; choose from hidden-update, wrong-sketch"):
        make_shard("lazy")


def test_the_cli_offers_exactly_the_modes_there_are():
    """node.cli keeps its own copy of the names (so `--help` does not import torch); it must not drift."""
    assert cli.DISHONEST_MODES == DISHONEST_MODES
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["join", "--coordinator", "h:1", "--dishonest", "lazy"])
    assert cli.build_parser().parse_args(["join", "--coordinator", "h:1", "--dishonest", "wrong-sketch"]).dishonest \
        == "wrong-sketch"
