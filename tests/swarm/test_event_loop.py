"""The P2P loop thread shuts down cleanly: a run's P2P client leaves nothing pending for the garbage collector,
which in a sweep collected it during the next run and printed asyncio tracebacks into its output."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

from hivemind import DHT

from swarm.p2p.event_loop import LoopThread


def test_a_p2p_client_left_after_the_loop_shut_down_is_collected_without_asyncio_errors(caplog, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        loop = LoopThread()
        p2p = loop.run(dht.replicate_p2p())  # as the trainer's chain holds one: a reader and a writer task
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.shutdown()
            closed, pending = loop.loop.is_closed(), asyncio.all_tasks(loop.loop)
            del p2p, loop  # both collected, as a finished run's are
            gc.collect()
    finally:
        dht.shutdown()
    assert not [record for record in caplog.records if record.name == "asyncio"], caplog.text
    assert not unraisable, [str(item.exc_value) for item in unraisable]
    assert closed and not pending  # a pending task is what asyncio complained of when it was collected later


def test_shutdown_cancels_tasks_still_running_on_the_loop():
    loop = LoopThread()
    started = asyncio.run_coroutine_threadsafe(asyncio.sleep(3600), loop.loop)
    loop.shutdown()
    assert started.cancelled() and loop.loop.is_closed()
    loop.shutdown()  # a second call is harmless
