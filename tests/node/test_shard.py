"""A node's Shard: training calls, applied steps and their account, phases, restores and replica copies."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from node.shard import MissingActivations
from swarm.audit.sketch import gradient_sketch, tensor_sha256
from swarm.lora import adapter_state, compute_lora
from swarm.models.checkpoint import tensors_sha256
from swarm.p2p.replica_sum import flatten_gradient
from tests.node.conftest import micro_batch, output_gradient, train_micro_batch, train_step

NO_OPTIMIZER_STATE = tensors_sha256({})


def copied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A snapshot: on the CPU in float32, Shard.adapter() and base_weights() are the live parameters."""
    return {name: tensor.clone() for name, tensor in tensors.items()}


def adapter_sha256(shard) -> str:
    return tensors_sha256(shard.adapter())


def trainable(shard) -> set[str]:
    return {name for name, param in shard.blocks.named_parameters() if param.requires_grad}


def lora_names(shard) -> set[str]:
    return {name for name, _ in shard.blocks.named_parameters() if ".lora_" in name}


def optimized(shard) -> set[int]:
    return {id(param) for group in shard.optimizer.param_groups for param in group["params"]}


def requiring_grad(shard) -> set[int]:
    return {id(param) for param in shard.blocks.parameters() if param.requires_grad}


def test_a_step_trains_the_adapter_and_attests_the_weights_before_and_after(make_shard, generator):
    shard = make_shard()
    base, weights_before = copied(shard.base_weights()), adapter_sha256(shard)
    first, second = micro_batch(generator), micro_batch(generator)
    shard.forward(0, 0, True, *first)
    shard.forward(0, 1, True, *second)
    shard.backward(0, 1, output_gradient(generator), None)  # added up in backward order, not forward order
    shard.backward(0, 0, output_gradient(generator), None)
    work = shard.apply_step(0, 0.01)
    assert list(work.micro_batches.items()) == [(1, tensor_sha256(second[0])), (0, tensor_sha256(first[0]))]
    assert work.tokens == int(first[1].sum() + second[1].sum())
    assert work.weights_sha256_before == weights_before != work.weights_sha256_after == adapter_sha256(shard)
    assert (work.optimizer_sha256_before, work.optimizer_sha256_after) == (NO_OPTIMIZER_STATE, shard.state_hashes()[1])
    assert work.optimizer_sha256_after != NO_OPTIMIZER_STATE
    assert work.local_gradient_sketch == work.gradient_sketch
    assert all(torch.equal(base[name], value) for name, value in shard.base_weights().items())
    assert shard.last_applied_step == 0


def test_the_step_state_is_the_trained_weights_and_moments_around_the_last_step(make_shard, generator):
    shard = make_shard()
    train_micro_batch(shard, 0, 0, micro_batch(generator), output_gradient(generator))
    before = copied(shard.adapter())
    shard.apply_step(0, 0.01)
    state = shard.step_state(0)
    assert all(torch.equal(state.before[f"weights/{name}"], value) for name, value in before.items())
    assert all(torch.equal(state.after[f"weights/{name}"], value) for name, value in shard.adapter().items())
    assert {key.partition("/")[0] for key in state.after} == {"weights", "exp_avg", "exp_avg_sq", "step"}
    with pytest.raises(ValueError, match="last applied step only"):
        shard.step_state(1)


def test_a_repeated_step_is_not_applied_twice(make_shard, generator):
    shard = make_shard()
    train_step(shard, 0, generator)
    hashes = shard.state_hashes()
    assert shard.apply_step(0, 0.01) is None
    assert shard.state_hashes() == hashes and shard.last_applied_step == 0


def test_an_older_step_is_refused_even_with_work_for_it(make_shard, generator):
    shard = make_shard()
    train_step(shard, 0, generator)
    train_step(shard, 1, generator)
    hashes = shard.state_hashes()
    train_micro_batch(shard, 0, 1, micro_batch(generator), output_gradient(generator))  # a late call of step 0
    assert shard.apply_step(0, 0.01) is None
    assert shard.state_hashes() == hashes and shard.last_applied_step == 1


def test_a_step_nothing_reached_is_refused_without_a_replica_group(make_shard):
    with pytest.raises(ValueError, match="no forward or backward call of it reached this node"):
        make_shard().apply_step(0, 0.01)


def test_backward_for_unknown_activations_raises_missing_activations(make_shard, generator):
    with pytest.raises(MissingActivations, match="step 3 micro-batch 1"):
        make_shard().backward(3, 1, output_gradient(generator), None)


def test_backward_with_resent_inputs_computes_what_forward_and_backward_compute(make_shard, generator):
    kept, resent = make_shard(), make_shard()
    inputs, grad = micro_batch(generator), output_gradient(generator)
    from_kept = train_micro_batch(kept, 0, 0, inputs, grad)
    from_resent = resent.backward(0, 0, grad, inputs)
    assert torch.equal(from_kept, from_resent)
    assert kept.apply_step(0, 0.01).weights_sha256_after == resent.apply_step(0, 0.01).weights_sha256_after


def test_a_retried_backward_returns_its_first_result_and_adds_no_gradient(make_shard, generator):
    once, twice = make_shard(), make_shard()
    inputs, grad = micro_batch(generator), output_gradient(generator)
    train_micro_batch(once, 0, 0, inputs, grad)
    first = train_micro_batch(twice, 0, 0, inputs, grad)
    assert torch.equal(twice.backward(0, 0, grad, None), first)
    assert list(twice.apply_step(0, 0.01).micro_batches) == [0]
    once.apply_step(0, 0.01)
    assert twice.state_hashes() == once.state_hashes()


@pytest.mark.parametrize("bad, message", [
    (lambda inputs: [inputs[0][..., :5], *inputs[1:]], "hidden states must be"),
    (lambda inputs: [inputs[0], inputs[1][:, :3], inputs[2]], "attention mask and position ids"),
    (lambda inputs: [inputs[0].long(), *inputs[1:]], "floating point"),
    (lambda inputs: [inputs[0].index_fill(1, torch.tensor([2]), float("nan")), *inputs[1:]], "NaN or inf"),
])
def test_forward_refuses_malformed_inputs(make_shard, generator, bad, message):
    shard = make_shard()
    with pytest.raises(ValueError, match=message):
        shard.forward(0, 0, True, *bad(micro_batch(generator)))
    assert not shard.pending and not shard.activations


def test_pretrain_trains_the_base_weights_and_a_lora_phase_the_adapter_each_with_fresh_adamw(make_shard, generator):
    shard = make_shard()
    lora = lora_names(shard)
    train_step(shard, 0, generator)
    shard.configure_phase("pretrain", "pretrain", "continue", "seed/1")
    base = {name for name, _ in shard.blocks.named_parameters()} - lora
    assert trainable(shard) == base and optimized(shard) == requiring_grad(shard) and not shard.optimizer.state
    adapter = copied(shard.adapter())
    work = train_step(shard, 1, generator)
    assert all(torch.equal(adapter[name], value) for name, value in shard.adapter().items())
    assert work.weights_sha256_after == tensors_sha256(shard.base_weights())
    shard.configure_phase("sft", "sft", "continue", "seed/2")
    assert trainable(shard) == lora and optimized(shard) == requiring_grad(shard) and not shard.optimizer.state
    assert shard.state_hashes() == (adapter_sha256(shard), NO_OPTIMIZER_STATE)
    assert shard.last_applied_step == 1  # step ids run on across phases
    assert shard.apply_step(1, 0.01) is None


def lora_computed(shard) -> bool:
    layers = [m for m in shard.blocks.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    return not any(layer.disable_adapters for layer in layers)


def test_pretraining_under_a_zero_adapter_skips_it_and_computes_the_same_bits(make_shard, generator):
    fast, full = make_shard(), make_shard()
    for shard in (fast, full):
        shard.configure_phase("pretrain", "pretrain", "continue", "seed")
    assert not lora_computed(fast)
    compute_lora(full.blocks, enabled=True)  # the adapter's matmuls, adding its zeros
    for step in range(2):
        inputs, grad = micro_batch(generator), output_gradient(generator)
        outputs = [shard.forward(step, 0, True, *inputs) for shard in (fast, full)]
        assert torch.equal(*outputs)
        assert torch.equal(*(shard.backward(step, 0, grad, None) for shard in (fast, full)))
        works = [shard.apply_step(step, 0.01) for shard in (fast, full)]
        assert works[0].weights_sha256_after == works[1].weights_sha256_after
        assert works[0].gradient_sketch == works[1].gradient_sketch
    fast.configure_phase("sft", "sft", "continue", "seed/2")
    assert lora_computed(fast) and trainable(fast) == lora_names(fast)


def test_pretraining_under_a_trained_adapter_keeps_computing_it(make_shard, generator):
    shard, plain = make_shard(), make_shard()
    train_step(shard, 0, generator)  # the adapter's B moves off zero
    shard.configure_phase("pretrain", "pretrain", "continue", "seed")
    plain.configure_phase("pretrain", "pretrain", "continue", "seed")
    assert lora_computed(shard) and trainable(shard) == trainable(plain)
    inputs = micro_batch(generator)
    with torch.no_grad():
        assert not torch.equal(shard.forward(1, 0, False, *inputs), plain.forward(1, 0, False, *inputs))


def test_a_phase_change_drops_unapplied_work(make_shard, generator):
    shard = make_shard()
    train_micro_batch(shard, 0, 0, micro_batch(generator), output_gradient(generator))
    shard.configure_phase("next", "sft", "continue", "seed")
    assert all(param.grad is None for param in shard.blocks.parameters())
    with pytest.raises(MissingActivations):
        shard.backward(0, 0, output_gradient(generator), None)  # not answered from the finished call before
    inputs = micro_batch(generator)
    train_micro_batch(shard, 0, 1, inputs, output_gradient(generator))
    assert shard.apply_step(0, 0.01).micro_batches == {1: tensor_sha256(inputs[0])}


def test_merge_folds_the_adapter_into_the_base_once_and_renews_it(make_shard, generator):
    shard = make_shard()
    train_step(shard, 0, generator)
    probe = micro_batch(generator)
    trained_output = shard.forward(1, 0, False, *probe)
    base = copied(shard.base_weights())
    shard.configure_phase("merged", "sft", "merge", "seed/1")
    assert any(not torch.equal(base[name], value) for name, value in shard.base_weights().items())
    assert all(not value.any() for name, value in shard.adapter().items() if ".lora_B." in name)
    assert torch.allclose(shard.forward(1, 0, False, *probe), trained_output, atol=1e-5)
    train_step(shard, 1, generator)
    hashes, merged = shard.state_hashes(), tensors_sha256(shard.base_weights())
    shard.configure_phase("merged", "sft", "merge", "seed/1")  # a retried call, however late
    assert (shard.state_hashes(), tensors_sha256(shard.base_weights())) == (hashes, merged)


def test_restore_takes_the_weights_sent_and_lets_the_steps_be_applied_again(make_shard, generator):
    shard, sent = make_shard(), make_shard()
    train_step(shard, 0, generator)
    train_step(shard, 1, generator)
    with torch.no_grad():
        for param in sent.blocks.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
    tensors = {**sent.base_weights(), **sent.adapter()}
    shard.restore("finished", [tensors[name] for name in sorted(tensors)])
    assert shard.state_hashes() == (adapter_sha256(sent), NO_OPTIMIZER_STATE)
    assert tensors_sha256(shard.base_weights()) == tensors_sha256(sent.base_weights())
    assert (shard.phase_name, shard.last_applied_step) == ("finished", -1)
    assert train_step(shard, 0, generator).weights_sha256_before == adapter_sha256(sent)


def test_restore_after_pretrain_trains_the_adapter_like_a_fresh_node(make_shard):
    shard, fresh = make_shard(), make_shard()
    shard.configure_phase("pretrain", "pretrain", "continue", "seed")
    tensors = {**shard.base_weights(), **shard.adapter()}
    shard.restore("pretrain", [tensors[name] for name in sorted(tensors)])
    assert trainable(shard) == trainable(fresh) == lora_names(fresh)
    assert optimized(shard) == requiring_grad(shard)


@pytest.mark.parametrize("change, message", [
    (lambda tensors: tensors[:-1], "restore takes"),
    (lambda tensors: [tensors[0][:1], *tensors[1:]], "must be"),
    (lambda tensors: [torch.full_like(tensors[0], float("inf")), *tensors[1:]], "not finite floating point"),
])
def test_restore_refuses_tensors_not_of_its_blocks_and_changes_nothing(make_shard, change, message):
    shard = make_shard()
    tensors = copied({**shard.base_weights(), **shard.adapter()})
    with torch.no_grad():
        for param in shard.blocks.parameters():
            param.add_(1.0)
    hashes = tensors_sha256({**shard.base_weights(), **shard.adapter()})
    with pytest.raises(ValueError, match=message):
        shard.restore("phase", change([tensors[name] for name in sorted(tensors)]))
    assert tensors_sha256({**shard.base_weights(), **shard.adapter()}) == hashes


@pytest.mark.parametrize("kind", ["sft", "pretrain"])
def test_a_replica_state_loaded_into_another_shard_hashes_and_trains_alike(make_shard, generator, kind):
    source, copy = make_shard(), make_shard()
    source.configure_phase("phase", kind, "continue", "seed")
    train_step(source, 0, generator)
    train_step(source, 1, generator)
    hashes = copy.load_replica_state("phase", kind, 1, source.replica_state())
    assert hashes == copy.state_hashes() == source.state_hashes()
    assert (copy.phase_name, copy.phase_kind, copy.last_applied_step) == ("phase", kind, 1)
    assert trainable(copy) == trainable(source) and optimized(copy) == requiring_grad(copy)
    assert copy.apply_step(1, 0.01) is None
    seed = torch.seed()  # the same micro-batch for both
    works = [train_step(shard, 2, torch.Generator().manual_seed(seed)) for shard in (source, copy)]
    assert works[0].optimizer_sha256_before == works[1].optimizer_sha256_before == hashes[1]
    assert works[0].weights_sha256_after == works[1].weights_sha256_after
    assert works[0].optimizer_sha256_after == works[1].optimizer_sha256_after


def test_a_replica_state_of_a_shard_that_never_stepped_loads_with_fresh_adamw(make_shard):
    source, copy = make_shard(), make_shard()
    assert copy.load_replica_state("", "sft", -1, source.replica_state())[1] == NO_OPTIMIZER_STATE


@pytest.mark.parametrize("change, message", [
    (lambda state: {**state, "param/model.layers.0.mlp.up_proj.weight": torch.zeros(1)}, "is not a tensor of blocks"),
    (lambda state: {key: value for key, value in state.items() if not key.endswith("lora_B.weight")}, "lacks"),
    (lambda state: {key: value.long() for key, value in state.items()}, "not finite floating point"),
])
def test_load_replica_state_refuses_a_state_not_of_its_blocks_and_changes_nothing(make_shard, change, message):
    shard = make_shard()
    state = shard.replica_state()
    with torch.no_grad():
        for param in shard.blocks.parameters():
            param.add_(1.0)
    hashes = tensors_sha256({**shard.base_weights(), **shard.adapter()})
    with pytest.raises(ValueError, match=message):
        shard.load_replica_state("phase", "sft", 0, change(state))
    assert tensors_sha256({**shard.base_weights(), **shard.adapter()}) == hashes
    with pytest.raises(ValueError, match="unknown phase kind"):
        shard.load_replica_state("phase", "finetune", 0, state)


def test_a_replica_group_step_uses_the_groups_sum_and_reports_both_sketches(make_shard, generator):
    shard = make_shard()
    train_micro_batch(shard, 0, 0, micro_batch(generator), output_gradient(generator))
    own = {name: param.grad.clone() for name, param in adapter_state(shard.blocks).items()}
    sent = []

    def tripled(flat: torch.Tensor) -> torch.Tensor:  # what a group of three identical replicas sums to
        sent.append(flat)
        return flat * 3

    work = shard.apply_step(0, 0.01, reduce=tripled)
    assert torch.equal(sent[0], flatten_gradient(own))
    assert work.local_gradient_sketch == gradient_sketch(own, shard.sketch_seed)
    assert work.gradient_sketch == gradient_sketch({name: grad * 3 for name, grad in own.items()}, shard.sketch_seed)


def test_a_replica_without_micro_batches_steps_with_the_groups_sum(make_shard, generator):
    worker, idle = make_shard(), make_shard()
    train_micro_batch(worker, 0, 0, micro_batch(generator), output_gradient(generator))
    group_sum = flatten_gradient({name: param.grad for name, param in adapter_state(worker.blocks).items()})
    worked = worker.apply_step(0, 0.01, reduce=lambda flat: group_sum)
    idled = idle.apply_step(0, 0.01, reduce=lambda flat: group_sum)
    assert (idled.micro_batches, idled.tokens) == ({}, 0)
    assert idled.weights_sha256_after == worked.weights_sha256_after
    assert idled.gradient_sketch == worked.gradient_sketch != idled.local_gradient_sketch


def test_a_failed_group_sum_changes_nothing_and_the_step_can_be_tried_again(make_shard, generator):
    shard = make_shard()
    train_micro_batch(shard, 0, 0, micro_batch(generator), output_gradient(generator))
    hashes = shard.state_hashes()

    def unreachable(flat):
        raise ConnectionError("replica gone")

    with pytest.raises(ConnectionError):
        shard.apply_step(0, 0.01, reduce=unreachable)
    assert shard.state_hashes() == hashes and shard.last_applied_step == -1
    assert shard.apply_step(0, 0.01, reduce=lambda flat: flat).micro_batches.keys() == {0}


@pytest.mark.parametrize("resent", [False, True], ids=["cached", "resent inputs"])
def test_a_refused_backward_changes_nothing_and_the_same_call_with_a_good_gradient_then_works(make_shard, generator,
                                                                                              resent):
    """NaN and wrongly shaped gradients are refused before the cached activations are taken or the resent
    inputs recorded (the fuzz tests found both changed by a refused call)."""
    refused, plain = make_shard(), make_shard()
    inputs, grad = micro_batch(generator), output_gradient(generator)
    for shard in (refused, plain):
        shard.forward(0, 0, True, *inputs)
        if resent:
            shard.activations.clear()  # as after a restart: the trainer sends the inputs with the backward
    bad = [grad.clone().index_fill_(1, torch.tensor([0]), float("nan")), grad[:, :-1]]
    for gradient in bad:
        with pytest.raises(ValueError, match="NaN or inf|gradient shape"):
            refused.backward(0, 0, gradient, list(inputs) if resent else None)
        assert set(refused.activations) == set(plain.activations)
        assert {s: (p.inputs, p.tokens, p.accumulated) for s, p in refused.pending.items()} == \
            {s: (p.inputs, p.tokens, p.accumulated) for s, p in plain.pending.items()}
    expected = plain.backward(0, 0, grad, list(inputs) if resent else None)
    assert torch.equal(refused.backward(0, 0, grad, list(inputs) if resent else None), expected)
    assert refused.apply_step(0, 0.01).weights_sha256_after == plain.apply_step(0, 0.01).weights_sha256_after


def test_a_first_range_told_its_input_gradient_is_unused_computes_none_and_trains_the_same_bits(make_shard, generator):
    told, plain = make_shard(), make_shard()
    for step in range(2):
        inputs, grad = micro_batch(generator), output_gradient(generator)
        assert torch.equal(told.forward(step, 0, True, *inputs, input_grad=False), plain.forward(step, 0, True, *inputs))
        unused = told.backward(step, 0, grad, None, input_grad=False)
        assert unused.numel() == 0 and plain.backward(step, 0, grad, None).shape == inputs[0].shape
        assert told.backward(step, 0, grad, None, input_grad=False).numel() == 0  # a retried call: the same answer
        works = [shard.apply_step(step, 0.01) for shard in (told, plain)]
        assert works[0].gradient_sketch == works[1].gradient_sketch
        assert works[0].weights_sha256_after == works[1].weights_sha256_after
    inputs, grad = micro_batch(generator), output_gradient(generator)
    told.forward(2, 0, True, *inputs, input_grad=False)
    with pytest.raises(ValueError, match="input gradient is unused"):
        told.backward(2, 0, grad, None)
    assert told.backward(2, 0, grad, None, input_grad=False).numel() == 0  # the refusal kept the activations
    resent = told.backward(3, 0, grad, inputs, input_grad=False)  # recomputed from re-sent inputs, on a replacement
    assert resent.numel() == 0 and told.apply_step(3, 0.01).micro_batches == {0: tensor_sha256(inputs[0])}
