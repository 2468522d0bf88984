"""The memory allocator swarm processes run under: tcmalloc where the machine has it, glibc's malloc otherwise.

Why: a node allocates and frees its activations and gradients on every call, LoRA's many small tensors among
them. Three node-like processes holding the main job's ranges of llama-1m, driven in turn over pipes
(`bench/allocator.py --kind lora`), took 0.88x the LoRA step under tcmalloc that they took under glibc; the
main job's training took 0.93x (backdoor 0.88x, adversarial 0.85x, RL 0.83x, safety SFT 1.04x, pretraining
0.95x), every loss and evaluation equal to the bit (docs/BENCHMARKS.md, "The memory allocator"). PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) preloads tcmalloc or jemalloc for the same reason.

A library replaces malloc only if it is loaded when the process starts (LD_PRELOAD), so the command lines
(`swarm-coordinator`, `swarm-node`) start themselves again under it once, before anything is imported, and the
processes the coordinator starts (local nodes, their fork server, the one-machine baseline) are started under
it (`child_env`), whether or not their caller is. The
environment decides: `SWARM_MALLOC=system` keeps glibc's malloc, `SWARM_MALLOC=/path/lib.so` preloads that
library, and an LD_PRELOAD the user set is left exactly as it is (two allocators must not be preloaded).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from swarm.errors import SwarmError

CHOICE = "SWARM_MALLOC"
SYSTEM = "system"
PRELOAD = "LD_PRELOAD"
# gperftools' tcmalloc (Debian: libtcmalloc-minimal4); the minimal build has no heap profiler, which nodes do not need
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
DIRECTORIES = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# tcmalloc reports every allocation over 1 GiB on stderr; a real model's weights are such allocations
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 62)}


def find_tcmalloc(directories: tuple[str, ...] = DIRECTORIES) -> Path | None:
    """tcmalloc's shared library on this machine, if there is one."""
    for directory in directories:
        for name in NAMES:
            path = Path(directory) / name
            if path.is_file():
                return path
    return None


def chosen_library(env: Mapping[str, str], directories: tuple[str, ...] = DIRECTORIES) -> Path | None:
    """The library a swarm process should preload under `env`: None for glibc's malloc (asked for, or no
    tcmalloc here) and when the user preloads something already."""
    choice = env.get(CHOICE, "").strip()
    if env.get(PRELOAD, "").strip() or choice == SYSTEM:
        return None
    if choice:
        path = Path(choice)
        if not path.is_file():
            raise SwarmError(f"{CHOICE}={choice}: no such library (set {CHOICE}={SYSTEM} for glibc's malloc)")
        return path
    return find_tcmalloc(directories)


def preloaded_env(env: Mapping[str, str], directories: tuple[str, ...] = DIRECTORIES) -> dict[str, str] | None:
    """`env` with the chosen allocator preloaded; None when nothing is to be preloaded."""
    library = chosen_library(env, directories)
    if library is None:
        return None
    return {**_QUIET, **env, PRELOAD: str(library)}


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment to start a swarm process with (a local node, the node fork server, the baseline): `env`
    with the chosen allocator preloaded, whether or not the caller itself runs under it (a bench or a test
    that drives the coordinator in its own process)."""
    return preloaded_env(env) or dict(env)


def restart_under_allocator(prog: str, launch: Sequence[str], env: Mapping[str, str]) -> None:
    """Start this command line again as `python LAUNCH ARGS` (LAUNCH: `-m MODULE`, or a bench's script) with
    environment `env` under the chosen allocator, unless it runs under it already or none is chosen; returns
    only in those cases. Call it before any heavy import; `env` is the environment the command was started with
    (swarm.process_env.alone())."""
    try:
        env = preloaded_env(env)
    except SwarmError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *launch, *sys.argv[1:]], env)


def allocator_in(maps: str) -> str:
    """Which allocator a process whose /proc/PID/maps is `maps` runs under: tcmalloc's library, or glibc's."""
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[-1]).name.startswith("libtcmalloc"):  # the sixth field: the mapped file
            return fields[-1]
    return "glibc malloc"


def current_allocator() -> str:
    """This process's allocator, for its log (Linux; elsewhere, what LD_PRELOAD says)."""
    try:
        return allocator_in(Path("/proc/self/maps").read_text())
    except OSError:
        return os.environ.get(PRELOAD, "") or "the system's malloc"
