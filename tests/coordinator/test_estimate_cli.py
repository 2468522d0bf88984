"""`swarm-coordinator estimate` as a user runs it: a table, JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def estimate(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "estimate", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_prints_a_table_of_methods_and_bit_widths():
    result = estimate("--params", "1e10", "--volunteers", "16", "--link", "100Mbit")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("weights" in line and "optimizer" in line and "activations" in line for line in lines)
    assert any("min nodes" in line and "s/step" in line and "GPU-h/participant" in line for line in lines)
    for method in ("full", "LoRA r=8"):
        assert sum(line.startswith(method) for line in lines) == 6  # 16, 8 and 4 bits, in both tables


def test_json_output_parses():
    result = estimate("--params", "1.3e10", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert abs(report["model"]["num_parameters"] - 1.3e10) / 1.3e10 < 0.05
    rows = {(row["method"], row["bits"]): row for row in report["estimates"]}
    assert set(rows) == {(method, bits) for method in ("full", "lora") for bits in (16, 8, 4)}
    per_block = {bits: rows["lora", bits]["memory"]["weights"] / rows["lora", bits]["stage_blocks"] for bits in (4, 16)}
    assert abs(per_block[4] / per_block[16] - 0.25) < 1e-3
    assert rows["full", 16]["flops_per_token"] > rows["lora", 16]["flops_per_token"]


def test_bad_node_memory_is_one_line_naming_the_flag():
    result = estimate("--params", "1e10", "--node-mem", "24XB")
    assert result.returncode == 2
    assert "--node-mem" in result.stderr and "24GiB" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_a_preset_shape_can_be_estimated():
    result = estimate("--preset", "llama-small", "--seq", "128", "--batch", "8", "--micro-batch", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["num_parameters"] == 6_394_112
