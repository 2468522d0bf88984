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
                   "spin": os.environ.get("GOMP_SPINCOUNT"), "alone": process_env.alone().get("OMP_WAIT_POLICY"),
                   "alone_spin": process_env.alone().get("GOMP_SPINCOUNT")}}))
"""


def probe(module: str, policy: str | None, spin: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["node.cli", "coordinator.cli"])
def test_a_command_line_makes_idle_threads_sleep_after_a_short_spin_before_torch_loads_unless_the_user_chose(module):
    unset = probe(module, None)
    assert unset == {"torch_loaded": False, "policy": "PASSIVE", "spin": "10000", "alone": None, "alone_spin": None}, unset
    chosen = probe(module, "ACTIVE", "0")
    assert chosen == {"torch_loaded": False, "policy": "ACTIVE", "spin": "0", "alone": "ACTIVE", "alone_spin": "0"}, chosen
