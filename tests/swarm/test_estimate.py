"""The resource estimator: hand-computed figures, the directions it must move in, and a measured byte count."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm.errors import SwarmError
from swarm.estimate import (LORA_TARGETS, EstimateInputError, ModelShape, ModelShapeError, NodeSpec, SizeFormatError,
                            Workload, blocks_per_node, boundary_bytes, estimate, flops_per_token, inputs_from_flags,
                            link_bytes_per_micro_batch, llama_shape, node_memory, parse_bandwidth, parse_bytes,
                            parse_count, weight_bytes)
from swarm.models.presets import PRESETS

GIB = 1 << 30
SMALL = ModelShape.from_preset(PRESETS["llama-small"])  # 8 layers, hidden 256, intermediate 688, 4 heads, vocab 128


def test_preset_shapes_count_exactly_the_presets_parameters():
    for name, preset in PRESETS.items():
        if preset.family == "llama":  # other families' presets are not Llama-shaped
            assert ModelShape.from_preset(preset).num_parameters == preset.num_parameters, name
    # by hand: a block is 4 * 256^2 (attention) + 3 * 256 * 688 (MLP) + 2 * 256 (norms) = 791,040
    assert SMALL.block_params == 791_040
    assert SMALL.num_parameters == 8 * 791_040 + 2 * 128 * 256 + 256 == 6_394_112


def test_derived_shape_reproduces_llama_2_7b_and_13b():
    assert llama_shape(6.74e9) == ModelShape(32, 4096, 11008, 32, 32, 32000)
    assert llama_shape(6.74e9).num_parameters == 6_738_415_616  # Llama-2-7b's published count
    assert llama_shape(1.3016e10) == ModelShape(40, 5120, 13824, 40, 40, 32000)
    assert llama_shape(1.3016e10).num_parameters == 13_015_864_320


@pytest.mark.parametrize("params", [8.1e8, 1.6e9, 3.5e9, 1e10, 2.2e10, 5.2e10, 1.7e11])
def test_derived_shapes_have_the_requested_size_and_llama_proportions(params):
    shape = llama_shape(params)
    assert abs(shape.num_parameters - params) / params < 0.05
    assert 100 <= shape.hidden / shape.layers <= 170
    assert shape.head_dim == 128


def test_too_small_a_parameter_count_is_refused_with_the_flag():
    with pytest.raises(ModelShapeError, match="--params"):
        llama_shape(1e6)


def test_lora_node_memory_of_llama_small_by_hand():
    work = Workload(lora_rank=8, seq=128, micro_batch=8, activation_bytes=4)
    memory = node_memory(SMALL, work, "lora", 16, blocks=8)
    lora_per_block = 8 * (4 * (256 + 256) + 3 * (256 + 688))  # A and B of q, k, v, o, gate, up, down = 39,040
    assert SMALL.lora_params_per_block(8) == lora_per_block == 39_040
    assert memory.weights == 8 * 791_040 * 2
    assert (memory.adapters, memory.gradients, memory.optimizer) == (8 * lora_per_block * 4, 8 * lora_per_block * 4,
                                                                      8 * lora_per_block * 8)
    # per token and block: 6h + 2 kv + 4f + 7 r = 1536 + 512 + 2752 + 56 values, fp32, for 8 x 128 tokens
    assert memory.activations == 8 * (1536 + 512 + 2752 + 56) * (8 * 128) * 4


def test_full_fine_tuning_keeps_16_bytes_per_parameter_at_16_bits():
    memory = node_memory(SMALL, Workload(), "full", 16, blocks=3)
    assert (memory.weights + memory.gradients + memory.optimizer) == 16 * 3 * SMALL.block_params
    assert memory.adapters == 0


def test_4_bit_weights_are_a_quarter_of_16_bit():
    assert weight_bytes(SMALL.block_linear_params, 4) == weight_bytes(SMALL.block_linear_params, 16) / 4
    shape = llama_shape(1e10)
    four, sixteen = (node_memory(shape, Workload(), "lora", bits, blocks=10).weights for bits in (4, 16))
    assert four == pytest.approx(sixteen / 4, rel=1e-3)  # norms stay 16-bit: 2h of ~12h^2 per block


def test_recomputation_trades_activations_for_a_forward():
    plain, recomputed = Workload(), Workload(recompute=True)
    shape = llama_shape(1e10)
    kept = {work: node_memory(shape, work, "lora", 4, blocks=20).activations for work in (plain, recomputed)}
    assert kept[recomputed] < kept[plain] / 5
    extra = flops_per_token(shape, recomputed, "full").block - flops_per_token(shape, plain, "full").block
    assert extra == 2 * shape.block_linear_params + 4 * 512 * shape.hidden


def test_activation_bytes_across_a_boundary():
    assert boundary_bytes(tokens=8 * 128, hidden=256, wire_bytes=4) == 8 * 128 * 256 * 4 == 1_048_576


def test_training_flops_per_token_are_6n_for_full_and_4n_plus_adapters_for_lora():
    seq = 128
    work = Workload(seq=seq)
    attention = 8 * 12 * seq * 256  # PaLM's 12 L s h: QK^T and AV, forward and backward
    matmul_params = SMALL.num_parameters - 128 * 256 - (8 * 2 * 256 + 256)  # all but the embedding and norms
    full = flops_per_token(SMALL, work, "full")
    assert full.total(8) - attention == 6 * matmul_params
    lora = flops_per_token(SMALL, work, "lora")
    assert lora.total(8) - attention == 4 * matmul_params + 6 * 8 * 39_040


def test_more_volunteers_shrink_each_participants_share():
    shape, work = llama_shape(1e10), Workload()
    node = NodeSpec(link_bytes_per_s=10e9 / 8, latency_s=0.001)
    shares = [estimate(shape, work, NodeSpec(**{**node.__dict__, "volunteers": v}), "lora", 4) for v in (2, 8, 32)]
    hours = [row.participant["gpu_hours_held"] for row in shares]
    assert hours[0] > hours[1] > hours[2]
    assert all(row.nodes_used <= v for row, v in zip(shares, (2, 8, 32)))


def test_lower_bit_widths_need_fewer_nodes():
    shape, work, node = llama_shape(1.7e11), Workload(), NodeSpec()
    nodes = [estimate(shape, work, node, "lora", bits).min_nodes for bits in (16, 8, 4)]
    assert nodes[0] > nodes[1] > nodes[2]
    assert [blocks_per_node(shape, work, node, "lora", bits) for bits in (16, 8, 4)] == sorted(
        blocks_per_node(shape, work, node, "lora", bits) for bits in (16, 8, 4))


def test_a_block_too_big_for_a_node_is_reported_not_placed():
    row = estimate(llama_shape(1.7e11), Workload(), NodeSpec(), "full", 16)  # ~1.8e9 params x 16 bytes > 24 GiB
    assert row.blocks_per_node == 0 and row.min_nodes is None and row.seconds_per_step is None
    assert row.gpu_hours_ideal > 0


def test_fewer_volunteers_than_needed_are_flagged():
    row = estimate(llama_shape(1.7e11), Workload(), NodeSpec(volunteers=2), "lora", 16)
    assert row.short_of_volunteers and row.nodes_used == row.min_nodes > 2


@pytest.mark.parametrize("compression, wire_bytes", [(runtime_pb2.CompressionType.NONE, 4),
                                                     (runtime_pb2.CompressionType.FLOAT16, 2)])
def test_estimated_link_bytes_match_hivemind_serialization_of_a_llama_micro_batch(compression, wire_bytes):
    """What the trainer sends a stage (hidden, mask, positions) and gets back in backward (grad), serialized."""
    shape = ModelShape.from_preset(PRESETS["llama-micro"])
    batch, seq = 4, 48
    hidden = torch.randn(batch, seq, shape.hidden)
    mask = torch.ones(batch, seq, dtype=torch.long)
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    grad = torch.randn(batch, seq, shape.hidden)
    forward = [serialize_torch_tensor(hidden, compression)] + [serialize_torch_tensor(t) for t in (mask, positions)]
    backward = [serialize_torch_tensor(grad, compression)]
    measured = sum(message.ByteSize() for message in forward + backward)
    estimated = link_bytes_per_micro_batch(shape, Workload(seq=seq, micro_batch=batch, wire_bytes=wire_bytes))
    assert estimated / 1.02 <= measured <= estimated * 1.02  # serialization adds ~20 header bytes per tensor


@pytest.mark.parametrize("text, expected", [("1e10", 1e10), ("13B", 13e9), ("810M", 810e6), ("20k", 2e4), ("512", 512)])
def test_counts_parse(text, expected):
    assert parse_count(text, "--params") == expected


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * GIB), ("512MiB", 512 << 20), ("80GB", 80e9), ("1e10", 1e10),
                                            ("1.5 GiB", 1.5 * GIB)])
def test_sizes_parse(text, expected):
    assert parse_bytes(text, "--node-mem") == expected


@pytest.mark.parametrize("text, bytes_per_s", [("100Mbit", 12.5e6), ("1Gbit", 125e6), ("1gbit/s", 125e6),
                                               ("20Mbps", 2.5e6), ("12.5MB/s", 12.5e6)])
def test_bandwidths_parse(text, bytes_per_s):
    assert parse_bandwidth(text, "--link") == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("parse, text, flag", [(parse_bytes, "24XB", "--node-mem"), (parse_bytes, "GiB", "--node-mem"),
                                               (parse_bandwidth, "100", "--link"), (parse_bandwidth, "100MB", "--link"),
                                               (parse_count, "ten", "--tokens"), (parse_count, "1e10x", "--params")])
def test_malformed_values_name_the_flag_and_the_accepted_forms(parse, text, flag):
    with pytest.raises(SizeFormatError) as caught:
        parse(text, flag)
    assert isinstance(caught.value, SwarmError)
    assert flag in str(caught.value) and "such as" in str(caught.value)


@pytest.mark.parametrize("flags, message", [
    ({"params": "1e10", "layers": "32"}, "exactly one of --params"),
    ({"layers": "32"}, "--layers needs --hidden"),
    ({"params": "1e10", "efficiency": "1.5"}, "--efficiency"),
    ({"params": "1e10", "volunteers": "0"}, "--volunteers"),
    ({"params": "1e10", "lora_targets": "q_proj,attn"}, "--lora-targets"),
    ({"layers": "4", "hidden": "300", "heads": "7"}, "--heads 7 must divide --hidden 300"),
    ({"params": "1e10", "batch": "30", "micro_batch": "4"}, "--batch 30 must be a multiple of --micro-batch 4"),
])
def test_inconsistent_flags_are_refused(flags, message):
    with pytest.raises(EstimateInputError, match=message):
        inputs_from_flags(flags)


def test_flags_build_the_inputs():
    shape, work, node = inputs_from_flags({"layers": "4", "hidden": "512", "lora_targets": "q_proj,v_proj",
                                           "node_mem": "80GiB", "link": "1Gbit", "latency_ms": "0"})
    assert shape == ModelShape(4, 512, 1536, 4, 4, 32000)
    assert work.lora_targets == ("q_proj", "v_proj") and work.lora_targets != LORA_TARGETS
    assert (node.memory_bytes, node.link_bytes_per_s, node.latency_s) == (80 * GIB, 125e6, 0.0)
