"""The trainer's calls to real node processes over their direct data channels, and over hivemind P2P where a
node serves none (`swarm-node join --no-channel`) or its channel cannot be reached: the same logits to the bit
whichever way a call goes, and a node whose channel is unreachable is called over P2P from then on."""

from __future__ import annotations

import logging
import signal
import socket

import pytest
import torch

from coordinator.chain.channels import Channel
from coordinator.prepared_job import RunOptions, prepare_job
from coordinator.run_dir import create_run_dir
from coordinator.session import SwarmSession
from coordinator.trainer import swarm_logits
from tests.conftest import started_processes, write_job
from tests.integration.helpers import finish


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A coordinator session over two nodes, each serving half the blocks: one with a channel, one without."""
    tmp = tmp_path_factory.mktemp("channel")
    job_file = write_job(tmp, training={"steps": 3, "batch_size": 4, "micro_batches": 1},
                         swarm={"min_nodes": 2, "stages": 2})
    options = RunOptions(job_file=job_file, run_dir=tmp / "run", local_nodes=0, node_threads=1, progress=False)
    prepared = prepare_job(options)
    create_run_dir(options.runs_root, prepared.job.name, job_file, options.run_dir)
    with started_processes() as start, SwarmSession(prepared, options.run_dir, options) as session:
        nodes = [start("-m", "node.cli", "join", *session.join_flags, "--key", str(tmp / f"node{i}.key"),
                       "--threads", "1", *extra) for i, extra in enumerate(([], ["--no-channel"]))]
        session.gather()
        yield prepared, session
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            finish(node, timeout=60)


def logits(session, batch) -> torch.Tensor:
    return swarm_logits(session.chain, session.head, batch.input_ids, batch.attention_mask)


def test_calls_go_over_the_channel_where_a_node_has_one(served):
    prepared, session = served
    batch = prepared.data.batch(0)
    transport = session.chain.transport
    over_channels = logits(session, batch)
    known = {stage.peer_id: transport.channels._channels.get(stage.peer_id) for stage in session.chain.stages}
    assert sorted(isinstance(channel, Channel) for channel in known.values()) == [False, True]
    assert [len(channel.idle) for channel in known.values() if channel is not None] == [1]  # kept for the next

    channels, transport.channels = transport.channels, None  # every call over hivemind P2P
    try:
        over_p2p = logits(session, batch)
    finally:
        transport.channels = channels
    assert torch.equal(over_channels, over_p2p)


def test_a_node_whose_channel_cannot_be_reached_is_called_over_p2p(served, caplog):
    prepared, session = served
    batch = prepared.data.batch(1)
    transport = session.chain.transport
    before = logits(session, batch)
    peer, channel = next((peer, channel) for peer, channel in transport.channels._channels.items()
                         if channel is not None)
    with socket.socket() as closed:  # a port nothing listens on: the node "behind a firewall"
        closed.bind(("127.0.0.1", 0))
        unreachable_port = closed.getsockname()[1]
    channel.close()
    channel.port = unreachable_port
    with caplog.at_level(logging.WARNING, logger="swarm.coordinator"):
        after = logits(session, batch)
    assert torch.equal(before, after)
    assert transport.channels._channels[peer] is None
    assert any("cannot be reached" in record.getMessage() and "calling it over P2P" in record.getMessage()
               for record in caplog.records)
