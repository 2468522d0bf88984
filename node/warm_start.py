"""A local node started before its coordinator knows where it listens.

`swarm-coordinator run --local-nodes N` starts these first, so that each node's imports (torch, transformers,
peft, hivemind: seconds of CPU) run while the coordinator makes its own, instead of after it. The coordinator
then writes one JSON line to the node's stdin, `{"argv": [...], "log": PATH}`: the `swarm-node` arguments
(`join ...`) and the log file; the node sends its output there and runs as `swarm-node` with those arguments.
Stdin closed without a line (the coordinator stopped first): the process exits quietly.

    python -m node.warm_start
"""

from __future__ import annotations

import json
import os
import sys

from node import cli  # sets the process environment (swarm.process_env) before torch loads
from node import join  # noqa: F401  the heavy imports, now, while the coordinator starts


def main() -> None:
    line = sys.stdin.readline()
    if not line.strip():
        os._exit(0)
    order = json.loads(line)
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # a resumed run appends
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    quiet = os.open(os.devnull, os.O_RDONLY)
    os.dup2(quiet, 0)
    os.close(quiet)
    cli.main(order["argv"])


if __name__ == "__main__":
    main()
