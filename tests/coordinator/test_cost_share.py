"""The report's cost-share table, on a run directory built by hand: a real audit.db (AuditLog, signed
attestations), metrics.jsonl, nodes.json with reported peaks, and a baseline.json."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from coordinator.cost_share import cost_share, cost_share_lines
from coordinator.report import write_report
from swarm.audit import AuditLog
from swarm.audit.attestation import Attestation, MicroBatch, sign_attestation
from swarm.audit.query import who
from swarm.identity import Identity

# llama-micro (h 64, kv width 32, f 176) at LoRA r 8 on all seven targets and data.max_length 64, per token and
# block, by hand from docs/ESTIMATES.md: linears P = 2*64^2 + 2*64*32 + 3*64*176 = 46,080; LoRA
# 8*(9*64 + 2*32 + 3*176) = 9,344; attention 4*64*64 = 16,384.
LORA_BLOCK_FLOPS = 4 * 46_080 + 6 * 9_344 + 3 * 16_384  # 289,536
FULL_BLOCK_FLOPS = 6 * 46_080 + 3 * 16_384  # 325,632


def attest(log: AuditLog, node: Identity, phase: str, step: int, blocks: tuple[int, int], tokens: int,
           seconds: float, sent: int = 100, received: int = 50) -> None:
    hashes = {f.name: f"{step % 10}" * 64 for f in dataclasses.fields(Attestation) if "sha256" in f.name}
    attestation = Attestation(
        **hashes, job_id="job-1", phase=phase, step=step, block_start=blocks[0], block_end=blocks[1],
        replica_group=f"blocks-{blocks[0]}-{blocks[1]}", node_id=node.fingerprint,
        micro_batches=(MicroBatch(0, "a" * 64),), gradient_sketch=(0.5,), tokens=tokens, compute_seconds=seconds,
        bytes_sent=sent, bytes_received=received,
    )
    log.append_attestation(sign_attestation(attestation, node))


@pytest.fixture
def run_dir(tmp_path):
    """Two phases (pretrain, then sft) of 2 steps each on nodes A [0,2), B [2,4), C [4,6)."""
    nodes = [Identity.generate() for _ in range(3)]
    ranges = [(0, 2), (2, 4), (4, 6)]
    seconds = [1.0, 2.0, 5.0]
    with AuditLog.create(tmp_path / "audit.db", Identity.generate(), "job-1") as log:
        for node in nodes:
            log.register_node(node.public_key)
        for step, phase in enumerate(["pretrain", "pretrain", "sft", "sft"]):
            for node, blocks, spent in zip(nodes, ranges, seconds):
                attest(log, node, phase, step, blocks, tokens=100, seconds=spent, sent=1000 * (step + 1))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "cost", "model": {"preset": "llama-micro"},
        "phases": [{"kind": "pretrain", "steps": 2}, {"kind": "sft", "steps": 2}],
    }))
    rows = [{"type": "train", "phase": phase, "kind": phase, "step": step, "loss": 1.0, "tokens": 100,
             "seconds": 4.0, "safety_step": 0} for step, phase in enumerate(["pretrain", "pretrain", "sft", "sft"])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "nodes.json").write_text(json.dumps([
        {"node_id": node.fingerprint, "blocks": list(blocks), "device": "cpu", "peak_rss_bytes": (300 + i) << 20,
         "peak_device_bytes": 0} for i, (node, blocks) in enumerate(zip(nodes, ranges))]))
    (tmp_path / "baseline.json").write_text(json.dumps({
        "device": "cpu", "torch_threads": 2, "steps_timed": 3, "step_seconds": [0.1] * 3, "tokens": [100] * 3,
        "seconds_per_token": 0.001, "peak_rss_bytes": 500 << 20}))
    return tmp_path, nodes


def test_shares_sum_to_one_and_match_who(run_dir):
    path, nodes = run_dir
    share = cost_share(path)
    audited = {row.node_id: row for row in who(path / "audit.db")}
    assert [node.node_id for node in share.nodes] == [node.fingerprint for node in nodes]
    assert sum(node.compute_share for node in share.nodes) == pytest.approx(1.0)
    assert sum(node.flops_share for node in share.nodes) == pytest.approx(1.0)
    for node in share.nodes:
        row = audited[node.node_id]
        assert (node.tokens, node.steps, node.blocks) == (row.tokens, row.steps, row.blocks)
        assert node.compute_seconds == pytest.approx(row.compute_seconds)
        assert node.compute_share == pytest.approx(row.compute_share)
    assert [node.compute_share for node in share.nodes] == pytest.approx([1 / 8, 2 / 8, 5 / 8])


def test_flops_follow_blocks_and_phase_kind_not_time(run_dir):
    path, _ = run_dir
    share = cost_share(path)
    per_node = 2 * 100 * 2 * FULL_BLOCK_FLOPS + 2 * 100 * 2 * LORA_BLOCK_FLOPS  # 2 steps per phase, 2 blocks
    assert [node.flops for node in share.nodes] == pytest.approx([per_node] * 3)
    assert [node.flops_share for node in share.nodes] == pytest.approx([1 / 3] * 3)
    # one machine does the blocks and the head: 6 blocks per token plus 6Vh (full) or 4Vh (LoRA), V=128, h=64
    head = 2 * 100 * 6 * 128 * 64 + 2 * 100 * 4 * 128 * 64
    assert share.trainer_flops == pytest.approx(head)
    assert share.one_machine.flops == pytest.approx(3 * per_node + head)


def test_a_node_whose_range_changed_mid_phase_is_charged_per_block(tmp_path):
    node = Identity.generate()
    with AuditLog.create(tmp_path / "audit.db", Identity.generate(), "job-1") as log:
        log.register_node(node.public_key)
        attest(log, node, "train", 0, (0, 2), tokens=100, seconds=1.0)
        attest(log, node, "train", 1, (0, 3), tokens=100, seconds=1.0)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"name": "c", "model": {"preset": "llama-micro"},
                                                       "training": {"steps": 2}}))
    row = {"type": "train", "phase": "train", "kind": "sft", "tokens": 100, "seconds": 1.0}
    (tmp_path / "metrics.jsonl").write_text((json.dumps(row) + "\n") * 2)
    (node_cost,) = cost_share(tmp_path).nodes
    assert node_cost.flops == pytest.approx((2 + 3) * 100 * LORA_BLOCK_FLOPS)


def test_bytes_are_the_attested_sums(run_dir):
    path, nodes = run_dir
    expected = {node.fingerprint: (1000 + 2000 + 3000 + 4000, 4 * 50) for node in nodes}
    assert {row.node_id: (row.bytes_sent, row.bytes_received) for row in who(path / "audit.db")} == expected
    assert all((node.bytes_sent, node.bytes_received) == (10_000, 200) for node in cost_share(path).nodes)


def test_one_machine_seconds_are_each_phase_kinds_measured_rate_times_its_tokens(run_dir):
    path, _ = run_dir
    baseline = json.loads((path / "baseline.json").read_text())
    (path / "baseline.json").write_text(json.dumps({**baseline, "pretrain_seconds_per_token": 0.0004}))
    share = cost_share(path)
    assert share.one_machine.seconds == pytest.approx(0.0004 * 200 + 0.001 * 200)  # pretrain, then sft
    assert "full-parameter steps, 0.400 ms per token" in share.one_machine.how
    assert "estimated" not in share.one_machine.how
    assert share.one_machine.peak_rss_bytes == 500 << 20


def test_a_baseline_without_timed_full_steps_scales_pretrain_by_the_flops_ratio(run_dir):
    path, _ = run_dir
    share = cost_share(path)
    lora_total = 6 * LORA_BLOCK_FLOPS + 4 * 128 * 64
    full_total = 6 * FULL_BLOCK_FLOPS + 6 * 128 * 64
    assert share.one_machine.seconds == pytest.approx(0.001 * 200 * (1 + full_total / lora_total))
    assert "measured: 3 single-process" in share.one_machine.how and "estimated, not timed" in share.one_machine.how
    assert share.one_machine.peak_rss_bytes == 500 << 20


def test_the_report_has_the_table_with_each_nodes_peak_memory_and_says_what_the_share_is_of(run_dir):
    path, nodes = run_dir
    report = write_report(path).read_text()
    assert "share of compute s" in report and "share of FLOPs" in report
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [node.fingerprint for node in nodes]
    assert [row.split(" | ")[-1] for row in rows] == ["300 MiB |", "301 MiB |", "302 MiB |"]
    assert [row.split(" | ")[5] for row in rows] == ["12.5%", "25.0%", "62.5%"]
    assert "| peak memory | 302 MiB largest node, 903 MiB all nodes | 500 MiB | 0.60x (largest node) |" in report
    assert (path / "cost_share.png").read_bytes()[:4] == b"\x89PNG"


def test_without_a_baseline_the_report_says_so(run_dir):
    path, _ = run_dir
    (path / "baseline.json").unlink()
    assert cost_share(path).one_machine.seconds is None
    assert any("no single-process baseline was measured" in line for line in cost_share_lines(cost_share(path)))
