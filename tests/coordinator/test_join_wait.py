"""Waiting for nodes: the join timeout is the other volunteers' time, not our own local nodes' start-up."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from coordinator import assembly
from coordinator.membership import Membership, NodeRecord
from swarm.config import parse_job
from swarm.errors import JoinTimeoutError
from swarm.proto import control_pb2 as pb
from tests.conftest import job_dict


class StartingLocalNodes:
    """What _wait_for_nodes sees of LocalNodes: how many were started, which exited, where they log."""

    def __init__(self, count: int, logs_dir: Path):
        self.count, self.logs_dir = count, logs_dir

    def exited(self) -> list[tuple[int, int]]:
        return []


def _join_later(membership: Membership, node_ids: list[str], delay_s: float) -> threading.Thread:
    def join() -> None:
        time.sleep(delay_s)
        for node_id in node_ids:
            membership.add(NodeRecord(node_id=node_id, public_key=node_id.encode() * 8, hello=pb.NodeHello()))

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    return thread


def _job(min_nodes: int, join_timeout_s: float):
    return parse_job(job_dict(swarm={"min_nodes": min_nodes, "join_timeout_s": join_timeout_s}))


def test_a_local_node_slower_to_start_than_the_join_timeout_still_counts(tmp_path):
    membership = Membership()
    _join_later(membership, ["local-0"], delay_s=1.0)  # imports on a cold cache: longer than the timeout
    joined = assembly.wait_for_nodes(membership, _job(1, 0.3), StartingLocalNodes(1, tmp_path), "127.0.0.1:1")
    assert [record.node_id for record in joined] == ["local-0"]


def test_the_join_clock_starts_once_the_local_nodes_have_joined(tmp_path):
    membership = Membership()
    _join_later(membership, ["local-0"], delay_s=1.0)
    started = time.monotonic()
    with pytest.raises(JoinTimeoutError, match=r"only 1 of the 2 nodes .* joined within 0 s .*--coordinator 127.0.0.1:1"):
        assembly.wait_for_nodes(membership, _job(2, 0.4), StartingLocalNodes(1, tmp_path), "127.0.0.1:1")
    assert time.monotonic() - started >= 1.4  # 1 s of local start-up, then the whole timeout


def test_a_local_node_that_never_joins_is_an_error_naming_its_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(assembly, "LOCAL_NODE_START_TIMEOUT_S", 0.5)
    with pytest.raises(JoinTimeoutError, match=f"local nodes .* did not join within 0 s; their logs are in {tmp_path}"):
        assembly.wait_for_nodes(Membership(), _job(1, 60), StartingLocalNodes(1, tmp_path), "127.0.0.1:1")
