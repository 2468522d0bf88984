"""The environment our command lines give themselves before torch loads (swarm.process_env), in fresh
interpreters: libgomp reads OMP_WAIT_POLICY once, when torch loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import json, os, sys
import {module}
from swarm import process_env
print(json.dumps({{"torch_loaded": "torch" in sys.modules, "policy": os.environ.get("OMP_WAIT_POLICY"),
                   "alone": process_env.alone().get("OMP_WAIT_POLICY")}}))
"""


def probe(module: str, policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["node.cli", "coordinator.cli"])
def test_a_command_line_makes_idle_threads_sleep_before_torch_loads_unless_the_user_chose(module):
    unset = probe(module, None)
    assert unset == {"torch_loaded": False, "policy": "PASSIVE", "alone": None}, unset
    chosen = probe(module, "ACTIVE")
    assert chosen == {"torch_loaded": False, "policy": "ACTIVE", "alone": "ACTIVE"}, chosen
