"""One process that imports what a node needs once and forks local nodes from it.

`swarm-coordinator run --local-nodes N` needs N node processes on this machine, and each fresh interpreter spends
seconds of CPU importing torch, transformers, peft and hivemind: N times the same work, on cores the nodes and
the coordinator share. The CLI starts this server before its own heavy imports (so the two import side by side);
the server imports once and forks a node per order, a sweep's later runs included. It never computes (no torch op
runs here, so there is no OpenMP thread pool for a fork to lose) and works in one thread.

Protocol, JSON lines. On stdin, `{"argv": [...], "log": PATH, "cwd": DIR, "env": {...}}`: fork a child that
appends its output to PATH and runs as `swarm-node ARGV` from DIR with that environment (the orderer's, as a
fresh process would have had them; libraries already loaded keep what they read at import), in a session of
its own (its process group can be killed whole). On stdout:
`{"ready": true}` once imported; `{"pid": P}` per order, in order; `{"pid": P, "exit": CODE}` when a child ends
(CODE negative: killed by that signal, as subprocess reports it). Stdin closed: the server exits; children it
forked go on, and whoever ordered them stops them by process group.

    python -m node.fork_server
"""

from __future__ import annotations

import json
import os
import random
import select
import sys

from node import cli  # sets the process environment (swarm.process_env) before torch loads
from node import join  # noqa: F401  the heavy imports, once for every node this server forks

_POLL_S = 0.2  # how often a child's exit is looked for while no order arrives


def main() -> None:
    _send({"ready": True})
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], _POLL_S)
        _report_exits(children)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            os._exit(0)  # the coordinator is gone or done; its nodes are its to stop
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in filter(bytes.strip, lines):
            order = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _become_node(order)  # does not return
            children.add(pid)
            _send({"pid": pid})


def _become_node(order: dict) -> None:
    """In the forked child: a session of its own, the log as stdout and stderr, fresh randomness, then swarm-node."""
    os.setsid()
    os.chdir(order["cwd"])  # relative paths in ARGV are the orderer's
    os.environ.clear()
    os.environ.update(order["env"])
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # a resumed run appends
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    quiet = os.open(os.devnull, os.O_RDONLY)
    os.dup2(quiet, 0)
    os.close(quiet)
    random.seed()  # forked children would otherwise share the server's random state
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = ["swarm-node", *order["argv"]]
    _name_process("swarm-node")
    cli.main(order["argv"])  # ends the process (os._exit or SystemExit)
    os._exit(0)


def _name_process(name: str) -> None:
    """What ps -o comm, top and pkill -x see (the command line stays the server's: Python cannot rewrite it)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:  # no /proc
        pass


def _report_exits(children: set[int]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            _send({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _send(message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


if __name__ == "__main__":
    main()
