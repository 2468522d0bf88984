"""hivemind's DHT process, forked from ours, never finalizes objects it inherited: a real DHT is started by
start_dht while an object with a finalizer becomes garbage in the child and the child collects (gRPC's
finalizers, run so, hung a coordinator's DHT process for ever)."""

from __future__ import annotations

import gc
import os

from hivemind import DHT

from swarm.p2p.dht_process import start_dht


class Finalized:
    """Appends the pid of the process that finalizes it to a file."""

    def __init__(self, path):
        self.path = path
        self.cycle = self  # only the cyclic collector can free it

    def __del__(self):
        with open(self.path, "a") as out:
            out.write(f"{os.getpid()}\n")


ARMED: list[bool] = []  # the fork hook acts only while a test arms it (hooks cannot be unregistered)
HELD: list[Finalized] = []


def _in_child() -> None:
    if ARMED:
        HELD.clear()  # garbage from here on, in the child only
        gc.collect()


os.register_at_fork(after_in_child=_in_child)


def test_objects_alive_at_the_fork_are_never_finalized_in_the_dht_process(tmp_path):
    marks = tmp_path / "finalized-by"
    garbage = Finalized(marks)
    del garbage  # cyclic garbage before the fork: collected here, by us
    HELD.append(Finalized(marks))  # alive at the fork, garbage in the child once the hook clears it
    dht = DHT(start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    ARMED.append(True)
    try:
        start_dht(dht)
        ARMED.clear()
        assert dht.is_alive()
        assert dht.store("key", "value", expiration_time=1e12) and dht.get("key").value == "value"  # it serves
    finally:
        ARMED.clear()
        dht.shutdown()
    assert gc.isenabled() and gc.get_freeze_count() == 0  # unfrozen here, once the child started
    assert marks.read_text().split() == [str(os.getpid())]  # the cycle before the fork, finalized by us alone
    HELD.clear()
    gc.collect()
    assert marks.read_text().split() == [str(os.getpid())] * 2
