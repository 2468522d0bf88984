"""Environment a swarm process sets for itself before torch, gRPC and hivemind load: they read it once, at load.

Why OpenMP's wait policy: a swarm process shares its machine's cores (the trainer with local nodes, a node with
its owner's work, the test suite with the processes it starts), and libgomp's default policy makes idle threads
spin after every parallel region, stealing the cores of whoever computes next. On 2 cores, 70 steps of plain
peft on a tiny model took 65 s beside a running swarm with spinning threads and 15 s with sleeping ones (same
2 threads). A process that has the machine to itself (the one-machine baseline) runs under the caller's policy
instead: `alone()` gives its environment.
"""

from __future__ import annotations

import os

_WAIT_POLICY = "OMP_WAIT_POLICY"
_CALLERS_WAIT_POLICY = os.environ.get(_WAIT_POLICY)  # as the user left it, before prepare() set a default


def prepare() -> None:
    """Defaults for this process and the processes it starts; a value the user set wins."""
    # gRPC's C core logs fork() notes when hivemind starts its DHT process; keep the terminal for our own output.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.environ.setdefault(_WAIT_POLICY, "PASSIVE")


def alone() -> dict[str, str]:
    """The environment of a child process that has this machine's cores to itself: the caller's own OpenMP
    wait policy (libgomp's default where none was set), not the shared-cores default of prepare()."""
    env = dict(os.environ)
    env.pop(_WAIT_POLICY, None)
    if _CALLERS_WAIT_POLICY is not None:
        env[_WAIT_POLICY] = _CALLERS_WAIT_POLICY
    return env
