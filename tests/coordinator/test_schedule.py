"""The step schedule: how many micro-batches go at once, and that each replica takes their backward calls in
micro-batch order whatever order the threads get there in; a failed micro-batch frees every waiter."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.chain.schedule import StepAbandoned, StepSchedule
from coordinator.chain.stage import RemoteStage


def _stages(ranges: int, replicas: int) -> list[list[RemoteStage]]:
    return [[RemoteStage(None, r, r + 1, f"n{r}{k}") for k in range(replicas)] for r in range(ranges)]


@pytest.mark.parametrize(("micro", "ranges", "replicas", "pipeline", "workers"), [
    (4, 3, 1, True, 3), (8, 3, 2, True, 6), (4, 3, 1, False, 1), (4, 2, 2, False, 2), (2, 4, 1, True, 2),
    (1, 3, 1, True, 1)])
def test_micro_batches_in_flight(micro, ranges, replicas, pipeline, workers):
    assert StepSchedule(micro, ranges, replicas, pipeline).workers == workers


def _run_backwards(schedule: StepSchedule, routes: dict[int, list[RemoteStage]], arrival: list[int]) -> list:
    """Route micro-batches in order, then let their backward at range 0 arrive in `arrival` order (each thread
    starts a little after the previous); return the order they got their turns in, per replica."""
    for micro in sorted(routes):
        schedule.route(micro, lambda micro=micro: routes[micro])
    order, lock, threads = [], threading.Lock(), []

    def backward(micro):
        with schedule.backward_turn(0, micro):
            with lock:
                order.append((routes[micro][0].node_id, micro))

    for micro in arrival:
        thread = threading.Thread(target=backward, args=(micro,))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    return order


def test_one_replica_takes_backward_calls_in_micro_batch_order_whatever_the_arrival():
    (stage,), = _stages(1, 1)
    schedule = StepSchedule(4, 1, 1, pipeline=True)
    order = _run_backwards(schedule, {micro: [stage] for micro in range(4)}, arrival=[2, 3, 1, 0])
    assert [micro for _, micro in order] == [0, 1, 2, 3]


def test_each_replica_waits_only_for_its_own_earlier_micro_batches():
    a, b = _stages(1, 2)[0]
    schedule = StepSchedule(4, 1, 2, pipeline=True)
    routes = {0: [a], 1: [b], 2: [a], 3: [b]}
    order = _run_backwards(schedule, routes, arrival=[3, 2, 1, 0])
    assert [micro for node, micro in order if node == a.node_id] == [0, 2]
    assert [micro for node, micro in order if node == b.node_id] == [1, 3]
    assert order.index((b.node_id, 1)) < order.index((a.node_id, 0))  # b's micro-batch 1 did not wait for a's 0


def test_a_failed_micro_batch_frees_every_waiting_one():
    (stage,), = _stages(1, 1)
    schedule = StepSchedule(3, 1, 1, pipeline=True)
    for micro in range(3):
        schedule.route(micro, lambda: [stage])
    raised = []

    def waiter():
        try:
            with schedule.backward_turn(0, 2):
                pass
        except StepAbandoned as error:
            raised.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    assert thread.is_alive()  # micro-batch 2 waits for 0 and 1
    schedule.fail()
    thread.join(timeout=5)
    assert not thread.is_alive() and "another micro-batch of the step failed" in str(raised[0])
