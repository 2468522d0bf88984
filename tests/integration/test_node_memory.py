"""A node's memory grows with its shard, not with the model (fresh node processes, as volunteers run)."""

from __future__ import annotations

import json

from swarm.models.presets import PRESETS
from tests.conftest import write_job
from tests.integration.helpers import finish


def test_a_node_holding_a_third_of_the_blocks_uses_a_fraction_of_the_models_memory(tmp_path, processes):
    preset = PRESETS["llama-20m"]
    job_file = write_job(tmp_path, model={"preset": "llama-20m"}, training={"steps": 1, "batch_size": 2,
                                                                            "micro_batches": 1})
    coordinator = processes("-m", "coordinator.cli", "run", str(job_file), "--local-nodes", "3", "--fresh-nodes",
                            "--run-dir", str(tmp_path / "run"), "--node-threads", "1", "--no-progress", "--no-baseline")
    code, output = finish(coordinator, timeout=300)
    assert code == 0, output
    whole_model_bytes = preset.num_parameters * 4
    for node in json.loads((tmp_path / "run" / "nodes.json").read_text()):
        growth = node["rss_after_load"] - node["rss_before_load"]
        assert node["shard_bytes"] < 0.35 * whole_model_bytes
        assert growth >= 0.8 * node["shard_bytes"], node  # the measurement sees the weights it loaded
        assert growth < 0.6 * whole_model_bytes, node  # and far from the whole model (measured: ~0.45)
