"""Which allocator swarm processes run under (swarm.allocator): the choice from the environment, and the command
lines starting themselves again under it, in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarm import allocator
from swarm.errors import SwarmError
from tests.conftest import REPO

INSTALLED = allocator.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(INSTALLED is None, reason="tcmalloc is not installed here (Debian: "
                                                              "libtcmalloc-minimal4; .ci/run installs it)")


@pytest.fixture
def library_dir(tmp_path) -> tuple[str, ...]:
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"\x7fELF")
    return (str(tmp_path / "missing"), str(tmp_path))


def test_tcmalloc_is_chosen_where_the_machine_has_it(library_dir, tmp_path):
    assert allocator.find_tcmalloc(library_dir) == tmp_path / "libtcmalloc_minimal.so.4"
    assert allocator.find_tcmalloc((str(tmp_path / "missing"),)) is None
    env = allocator.preloaded_env({"PATH": "/bin"}, library_dir)
    assert env["LD_PRELOAD"] == str(tmp_path / "libtcmalloc_minimal.so.4") and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 1 << 40  # a real model's weights: no stderr report
    assert allocator.preloaded_env({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, library_dir)[
        "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's setting wins
    assert allocator.preloaded_env({}, (str(tmp_path / "missing"),)) is None  # none here: glibc's malloc


def test_the_user_keeps_glibc_or_their_own_preload_or_names_a_library(library_dir, tmp_path):
    assert allocator.preloaded_env({"SWARM_MALLOC": "system"}, library_dir) is None
    assert allocator.preloaded_env({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, library_dir) is None  # never two
    own = tmp_path / "libmine.so"
    own.write_bytes(b"\x7fELF")
    assert allocator.preloaded_env({"SWARM_MALLOC": str(own)}, library_dir)["LD_PRELOAD"] == str(own)
    with pytest.raises(SwarmError, match="SWARM_MALLOC=/nowhere/lib.so: no such library"):
        allocator.preloaded_env({"SWARM_MALLOC": "/nowhere/lib.so"}, library_dir)
    assert allocator.child_env({"SWARM_MALLOC": "system", "A": "1"}) == {"SWARM_MALLOC": "system", "A": "1"}


def test_a_process_map_tells_which_allocator_it_runs_under():
    maps = ("7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
            "7f02-7f03 rw-p 00000000 00:00 0 \n")
    assert allocator.allocator_in(maps) == "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10"
    assert allocator.allocator_in("7f02-7f03 rw-p 00000000 00:00 0 [heap]\n") == "glibc malloc"


def run_cli(module: str, *args: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SWARM_MALLOC")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)


# Both command lines fail fast here, after logging which allocator they run under.
BAD_NODE = ("node.cli", "join", "--coordinator", "nonsense", "--coordinator-key", "00", "--key", "/nonexistent/k")
BAD_RUN = ("coordinator.cli", "run", "/nonexistent/job.yaml", "--no-progress")


@needs_tcmalloc
@pytest.mark.parametrize("command", [BAD_NODE, BAD_RUN], ids=["swarm-node", "swarm-coordinator"])
def test_a_command_line_starts_itself_again_under_tcmalloc(command):
    done = run_cli(*command)
    assert f"memory allocator: {INSTALLED.resolve()}" in done.stderr, done.stderr
    assert done.returncode == 2 and "Traceback" not in done.stderr
    kept = run_cli(*command, SWARM_MALLOC="system")
    assert "memory allocator: glibc malloc" in kept.stderr, kept.stderr


@pytest.mark.parametrize("command", [BAD_NODE, BAD_RUN], ids=["swarm-node", "swarm-coordinator"])
def test_a_missing_library_is_a_clear_error(command):
    done = run_cli(*command, SWARM_MALLOC="/nowhere/libtcmalloc.so")
    prog = "swarm-node" if command[0] == "node.cli" else "swarm-coordinator"
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"{prog}: error: SWARM_MALLOC=/nowhere/libtcmalloc.so: no such library (set "
                                   "SWARM_MALLOC=system for glibc's malloc)")


@needs_tcmalloc
def test_the_node_fork_server_runs_under_tcmalloc_whoever_starts_it():
    """A bench or a test drives the coordinator in its own process, not under tcmalloc: the fork server it starts
    for local nodes (whose nodes share its allocator) still runs under it."""
    from coordinator.node_forks import NodeForkServer

    assert allocator.current_allocator() == "glibc malloc" or os.environ.get("LD_PRELOAD")
    server = NodeForkServer()
    try:
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    finally:
        server.close()
    assert allocator.allocator_in(maps) == str(INSTALLED.resolve())
