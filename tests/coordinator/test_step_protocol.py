"""StepProtocol.apply_step with a scripted transport: every range's step call is in flight before any answer
is awaited (the nodes step independently; one after another, a step cost one round trip per range), and the
answers are still recorded range by range."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from coordinator.chain.groups import ReplicaGroups
from coordinator.chain.stage import RemoteStage
from coordinator.chain.step_protocol import StepProtocol
from swarm.config import CompressionSpec
from swarm.p2p.rpc import STEP


class BarrierTransport:
    """Answers a step call only once every stage's call has arrived; a protocol that waits for one range's answer
    before calling the next breaks the barrier (its wait times out) and the call fails."""

    def __init__(self, stages: int):
        self.barrier = threading.Barrier(stages, timeout=10)
        self.pool = ThreadPoolExecutor(max_workers=stages)
        self.calls: list[str] = []
        self.peer_wait_s = 5.0

    def meta(self, stage, **fields):
        return SimpleNamespace(**fields)

    def submit(self, stage, method, meta):
        self.calls.append(f"{method} {stage.node_id} step {meta.step}")

        def answer():
            self.barrier.wait()
            return SimpleNamespace(averaging_bytes_sent=1, averaging_bytes_received=2), []

        return self.pool.submit(answer)


class RecordingLedger:
    def __init__(self):
        self.recorded: list[tuple[list[str], int]] = []

    def record_step(self, group, applied, phase, step):
        self.recorded.append(([stage.node_id for stage, _ in applied], step))

    def forget_through(self, step):
        pass


def test_every_ranges_step_call_is_in_flight_at_once_and_recorded_in_range_order():
    stages = [RemoteStage(None, 2, 4, "b"), RemoteStage(None, 0, 2, "a"), RemoteStage(None, 4, 6, "c")]
    transport, ledger = BarrierTransport(len(stages)), RecordingLedger()
    protocol = StepProtocol(transport, ReplicaGroups(stages), router=None, ledger=ledger, state=None,
                            compression=CompressionSpec())
    protocol.apply_step(3, 0.01)
    assert sorted(transport.calls) == [f"{STEP} {node} step 3" for node in "abc"]
    assert ledger.recorded == [(["a"], 3), (["b"], 3), (["c"], 3)]
    transport.pool.shutdown()
