"""Environment a swarm process sets for itself before torch, gRPC and hivemind load: they read it once, at load.

Why OpenMP's wait policy: a swarm process shares its machine's cores (the trainer with local nodes, a node with
its owner's work, the test suite with the processes it starts), and libgomp's default policy makes idle threads
spin after every parallel region, stealing the cores of whoever computes next. On 2 cores, 70 steps of plain
peft on a tiny model took 65 s beside a running swarm with spinning threads and 15 s with sleeping ones (same
2 threads). Sleeping at once is too much the other way: a thread then sleeps between two operations of one
forward pass and is woken for the next (a Shard of llama-small alone, idle 150 ms between calls as a node is,
took 96 + 118 ms for forward and backward with a 1,000-iteration spin, 62 + 70 ms under libgomp's defaults).
A short spin first
(`GOMP_SPINCOUNT`: ten thousand busy-wait iterations, a fraction of a millisecond; libgomp honours it under
PASSIVE) spans those gaps yet frees a finished call's cores for the next node soon enough: on a 2-vCPU Xeon
it made the Petals-shape swarm step 0.82x and the main job's backdoor step 0.85x of a 1,000-iteration spin,
and 30,000 gave back part of that (`bench/omp_spin.py`, docs/BENCHMARKS.md). A process that has the machine
to itself (the one-machine baseline) runs under the caller's settings instead: `alone()` gives its environment.
"""

from __future__ import annotations

import os

_WAIT_POLICY = "OMP_WAIT_POLICY"
_SPIN_COUNT = "GOMP_SPINCOUNT"
SHORT_SPIN = "10000"  # busy-wait iterations before an idle OpenMP thread sleeps
_CALLERS = {name: os.environ.get(name) for name in (_WAIT_POLICY, _SPIN_COUNT)}  # before prepare() set defaults


def prepare() -> None:
    """Defaults for this process and the processes it starts; a value the user set wins."""
    # gRPC's C core logs fork() notes when hivemind starts its DHT process; keep the terminal for our own output.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.environ.setdefault(_WAIT_POLICY, "PASSIVE")
    os.environ.setdefault(_SPIN_COUNT, SHORT_SPIN)


def alone() -> dict[str, str]:
    """The environment of a child process that has this machine's cores to itself: the caller's own OpenMP
    settings (libgomp's defaults where none was set), not the shared-cores defaults of prepare()."""
    env = dict(os.environ)
    for name, value in _CALLERS.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env
