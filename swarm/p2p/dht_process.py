"""Start hivemind's DHT process so that it cannot hang on the garbage of the process that forked it.

hivemind forks its DHT process from ours. A coordinator (or a node) that has used gRPC by then leaves gRPC
objects behind, some of them cyclic garbage; the first garbage collection in the forked child finalizes them,
and gRPC's finalizers wait on locks held by threads that were not forked: the DHT process hangs in
`gc_collect_main`, and every DHT lookup of the parent with it, for ever (a test's coordinator did, in a pytest
worker that had run earlier sessions). Collecting first and freezing what is left moves every object that
exists at the fork out of the child's collector's reach: the child only ever collects its own garbage.
"""

from __future__ import annotations

import gc

from hivemind import DHT


def start_dht(dht: DHT) -> None:
    """`dht.run_in_background(await_ready=True)` with the parent's objects frozen while the child forks."""
    gc.collect()
    gc.freeze()
    try:
        dht.run_in_background(await_ready=True)
    finally:
        gc.unfreeze()
