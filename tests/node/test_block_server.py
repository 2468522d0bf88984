"""BlockServer's calls as the trainer and other replicas make them, in process (tests.node.in_process)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarm.audit.attestation import MicroBatch, SignedAttestation, check_attestation
from swarm.audit.sketch import tensor_sha256
from swarm.p2p.rpc import (ADAPTER, ADMIT, BACKWARD, FETCH_STATE, FORWARD, LOAD_STATE, PHASE, REPLICA_STATE, RESTORE,
                           STEP, STEP_STATE, SYNC, WEIGHTS)
from swarm.proto.blocks_pb2 import CallResult
from tests.node.conftest import END, HIDDEN, START, micro_batch, output_gradient
from tests.node.in_process import (JOB, MAX_REQUEST_BYTES, PHASE_NAME, LocalP2P, apply_step, call, meta, random_work,
                                   run, serving, train)


def test_a_step_is_answered_with_a_signed_attestation_of_the_work_and_its_bytes(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            work = random_work(generator, micro_batches=(0, 1))
            exchanges = await train(trainer, node, 0, work)
            result, _, step_call = await call(trainer, node.peer_id, STEP, meta(step=0, learning_rate=0.01))
            assert result.status == CallResult.OK, result.error
            attestation = check_attestation(SignedAttestation(result.attestation, result.signature),
                                            server.identity.public_key, job_id=JOB, phase=PHASE_NAME, step=0,
                                            block_start=START, block_end=END)
            assert attestation.micro_batches == tuple(MicroBatch(micro, tensor_sha256(inputs[0]))
                                                      for micro, (inputs, _) in work.items())
            assert attestation.adapter_sha256_after == server.shard.state_hashes()[0]
            assert (result.tokens, result.compute_seconds) == (attestation.tokens, attestation.compute_seconds)
            assert attestation.bytes_received == sum(e.request_bytes for e in exchanges) + step_call.request_bytes
            assert attestation.bytes_sent == sum(e.response_bytes for e in exchanges)  # the reply can't count itself

    run(scenario)


def test_a_retried_step_gets_the_same_signed_bytes(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            await train(trainer, node, 0, random_work(generator))
            first = await apply_step(trainer, node, 0)
            hashes = server.shard.state_hashes()
            again = await apply_step(trainer, node, 0)
            assert (again.attestation, again.signature) == (first.attestation, first.signature)
            assert server.shard.state_hashes() == hashes

    run(scenario)


def test_a_step_older_than_the_last_applied_one_is_refused(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (_, node):
            for step_id in (0, 1):
                await train(trainer, node, step_id, random_work(generator))
                await apply_step(trainer, node, step_id)
            result, _, _ = await call(trainer, node.peer_id, STEP, meta(step=0, learning_rate=0.01))
            assert result.status == CallResult.ERROR
            assert "step 0 is older than the last applied step 1" in result.error

    run(scenario)


def test_a_step_of_another_phase_is_refused(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            await train(trainer, node, 0, random_work(generator))
            result, _, _ = await call(trainer, node.peer_id, STEP, meta(step=0, phase="sft-2", learning_rate=0.01))
            assert result.status == CallResult.ERROR and "this node is in 'sft-1'" in result.error
            assert server.shard.last_applied_step == -1

    run(scenario)


def no_tensors(generator) -> list:
    return []


def with_nan_hidden(generator) -> list:
    return [torch.full((2, 6, HIDDEN), float("nan")), *micro_batch(generator)[1:]]


def too_large(generator) -> list:
    return [torch.zeros(1, 9000, HIDDEN), *micro_batch(generator, 1, 9000)[1:]]


# case -> (caller, method, call metadata, its tensors from the test's generator, what the error must say)
REFUSED = {
    "wrong job": ("trainer", FORWARD, meta(job_id="other"), micro_batch, "unknown job id 'other'"),
    "wrong range": ("trainer", FORWARD, meta(block_start=0, block_end=2), micro_batch,
                    f"this node serves blocks {START}..{END - 1}, not 0..1"),
    "tensor count": ("trainer", FORWARD, meta(), lambda g: micro_batch(g)[:2],
                     "forward takes hidden states, attention mask and position ids; got 2 tensors"),
    "backward tensor count": ("trainer", BACKWARD, meta(includes_inputs=True), lambda g: [output_gradient(g)],
                              "got 1 tensors"),
    "nan": ("trainer", FORWARD, meta(train=True), with_nan_hidden, "hidden states contain NaN or inf"),
    "zero lr": ("trainer", STEP, meta(learning_rate=0.0), no_tensors, "learning rate must be positive, got 0.0"),
    "negative lr": ("trainer", STEP, meta(learning_rate=-0.1), no_tensors, "learning rate must be positive"),
    "not the trainer": ("stranger", FORWARD, meta(train=True), micro_batch, "is not this job's trainer"),
    "phase kind": ("trainer", PHASE, meta(phase="p", phase_kind="finetune", adapter_action="new"), no_tensors,
                   "unknown phase kind 'finetune'"),
    "adapter action": ("trainer", PHASE, meta(phase="p", phase_kind="sft", adapter_action="keep"), no_tensors,
                       "unknown adapter action 'keep'"),
    "too large": ("trainer", FORWARD, meta(), too_large, f"larger than this node's limit of {MAX_REQUEST_BYTES} bytes"),
    "restore count": ("trainer", RESTORE, meta(), lambda g: [torch.zeros(3)], "restore takes"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_call_gets_an_error_naming_the_problem_and_the_node_serves_on(make_shard, generator, case):
    caller, method, call_meta, tensors, message = REFUSED[case]

    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            sender = trainer if caller == "trainer" else LocalP2P(network, caller)
            result, outputs, _ = await call(sender, node.peer_id, method, call_meta, tensors(generator))
            assert (result.status, outputs) == (CallResult.ERROR, [])
            assert message in result.error
            assert not server.shard.pending and server.shard.last_applied_step == -1
            served, _, _ = await call(trainer, node.peer_id, FORWARD, meta(), micro_batch(generator))
            assert served.status == CallResult.OK

    run(scenario)


def test_backward_without_activations_asks_for_the_inputs(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (_, node):
            result, _, _ = await call(trainer, node.peer_id, BACKWARD, meta(step=0), [output_gradient(generator)])
            assert result.status == CallResult.MISSING_ACTIVATIONS
            resent, outputs, _ = await call(trainer, node.peer_id, BACKWARD, meta(step=0, includes_inputs=True),
                                            [output_gradient(generator), *micro_batch(generator)])
            assert resent.status == CallResult.OK and outputs[0].shape == (2, 6, HIDDEN)

    run(scenario)


def test_after_a_restore_a_step_is_applied_again_not_answered_from_before(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            shard = server.shard
            start = {name: value.clone() for name, value in {**shard.base_weights(), **shard.adapter()}.items()}
            await train(trainer, node, 0, random_work(generator))
            first = await apply_step(trainer, node, 0)
            restored, _, _ = await call(trainer, node.peer_id, RESTORE, meta(),
                                        [start[name] for name in sorted(start)])
            assert restored.status == CallResult.OK
            await train(trainer, node, 0, random_work(generator))
            again = await apply_step(trainer, node, 0, learning_rate=0.02)
            assert again.attestation != first.attestation
            assert SignedAttestation(again.attestation, again.signature).attestation.adapter_sha256_after \
                == shard.state_hashes()[0]

    run(scenario)


def test_downloads_are_named_in_sorted_order(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (server, node):
            await train(trainer, node, 0, random_work(generator))
            await apply_step(trainer, node, 0)
            for method, expected in ((ADAPTER, server.shard.adapter()), (WEIGHTS, server.shard.base_weights())):
                result, tensors, _ = await call(trainer, node.peer_id, method, meta())
                assert list(result.names) == sorted(expected)
                assert all(torch.equal(tensor, expected[name]) for name, tensor in zip(result.names, tensors))
            result, tensors, _ = await call(trainer, node.peer_id, STEP_STATE, meta(step=0))
            state = dict(zip(result.names, tensors))
            assert {name.partition("/")[0] for name in state} == {"before", "after"}
            adapter = server.shard.adapter()
            assert all(torch.equal(state[f"after/weights/{name}"], value) for name, value in adapter.items())

    run(scenario)


def test_load_state_takes_a_replica_state_and_answers_its_hashes(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "source", trainer) as (source, source_p2p), \
                serving(make_shard(), network, "copy", trainer) as (copy, copy_p2p):
            for step_id in (0, 1):
                await train(trainer, source_p2p, step_id, random_work(generator))
                await apply_step(trainer, source_p2p, step_id)
            state, tensors, _ = await call(trainer, source_p2p.peer_id, REPLICA_STATE, meta())
            loaded, _, _ = await call(trainer, copy_p2p.peer_id, LOAD_STATE,
                                      meta(phase_kind="sft", step=1, names=state.names), tensors)
            assert loaded.status == CallResult.OK, loaded.error
            assert (loaded.weights_sha256, loaded.optimizer_sha256) == source.shard.state_hashes()
            assert copy.shard.last_applied_step == 1 and copy.reducer.last_step == 1
            refused, _, _ = await call(trainer, copy_p2p.peer_id, LOAD_STATE,
                                       meta(phase_kind="sft", step=1, names=state.names[:-1]), tensors)
            assert refused.status == CallResult.ERROR and "load_state names" in refused.error

    run(scenario)


def test_a_new_replica_copies_the_state_of_the_replica_that_admitted_it_once(make_shard, generator):
    async def scenario(network, trainer):
        async with serving(make_shard(), network, "source", trainer) as (source, source_p2p), \
                serving(make_shard(), network, "new", trainer) as (new, new_p2p):
            await train(trainer, source_p2p, 0, random_work(generator))
            await apply_step(trainer, source_p2p, 0)
            admitted, _, _ = await call(trainer, source_p2p.peer_id, ADMIT,
                                        meta(replica_peers=[new_p2p.peer_id.to_base58()]))
            synced, _, _ = await call(trainer, new_p2p.peer_id, SYNC, meta(
                phase_kind="sft", step=0, replica_peers=[source_p2p.peer_id.to_base58()]))
            assert synced.status == CallResult.OK, synced.error
            assert (synced.weights_sha256, synced.optimizer_sha256) == (admitted.weights_sha256,
                                                                         admitted.optimizer_sha256)
            assert new.shard.state_hashes() == source.shard.state_hashes()
            again, _, _ = await call(new_p2p, source_p2p.peer_id, FETCH_STATE, meta())
            assert again.status == CallResult.ERROR and "was not admitted" in again.error

    run(scenario)


@pytest.mark.parametrize("method", [FORWARD, FETCH_STATE])
def test_a_peer_that_may_not_call_is_refused_before_its_request_is_read(make_shard, generator, method):
    """A stranger's stream costs the node nothing: it is answered at once, even one whose request never ends
    (the node used to read, and keep, a stranger's request up to its size limit before refusing it)."""
    async def never_ending():
        yield runtime_pb2.ExpertRequest(metadata=meta().SerializeToString())
        await asyncio.Event().wait()

    async def scenario(network, trainer):
        async with serving(make_shard(), network, "node", trainer) as (_, node):
            context = P2PContext(handle_name=method, local_id=node.peer_id, remote_id=PeerID(b"stranger"))
            replies = node.handlers[method](never_ending(), context)
            reply = await asyncio.wait_for(anext(replies), timeout=5)
            await replies.aclose()
            result = CallResult.FromString(reply.metadata)
            assert result.status == CallResult.ERROR and result.error.startswith("PermissionError: peer ")

    run(scenario)
