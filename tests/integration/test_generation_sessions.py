"""Generation with inference sessions over real node processes: the same greedy tokens as re-sending the
prefix for every token, also when a node loses the session mid-answer or the replica holding it is killed;
and the prompt crosses the chain once (far fewer bytes)."""

from __future__ import annotations

import signal

import torch

from coordinator.generation import BoundaryCapture, generate, generate_ids
from coordinator.live_probe import Boundary, boundary_states
from swarm.identity import Identity
from swarm.p2p.rpc import END_SESSION
from swarm.traffic import Traffic
from tests.conftest import write_job
from tests.integration.helpers import local_session

PROMPTS = ["12+7=", "reverse: abc", "3+4=", "reverse: hello world", "a", "40+2="]  # unequal: left padding
NEW_TOKENS = 12


def _interrupt_after(chain, calls: int, interrupt) -> list:
    """Make generation's sessions call `interrupt(session)` once, before their forward number `calls`."""
    opened, open_session = [], chain.open_session

    def instrumented(*args, **kwargs):
        session = open_session(*args, **kwargs)
        forward, count = session.forward, [0]

        def forward_then_interrupt(*forward_args):
            count[0] += 1
            if count[0] == calls:
                interrupt(session)
            return forward(*forward_args)

        session.forward = forward_then_interrupt
        opened.append(session)
        return session

    chain.open_session = instrumented
    return opened


def test_cached_tokens_equal_uncached_ones_and_a_lost_session_is_refilled(tmp_path):
    job_file = write_job(tmp_path, swarm={"min_nodes": 2})
    with local_session(job_file, tmp_path / "run", nodes=2) as (prepared, session):
        chain, head, tokenizer = session.chain, session.head, prepared.tokenizer
        before = chain.stream_totals()
        uncached = generate_ids(chain, head, tokenizer, PROMPTS, NEW_TOKENS, kv_cache=False)
        middle = chain.stream_totals()
        cached = generate_ids(chain, head, tokenizer, PROMPTS, NEW_TOKENS, kv_cache=True)
        after = chain.stream_totals()
        assert cached == uncached
        assert sum(len(answer) for answer in uncached) > len(PROMPTS)  # real answers, not all empty
        _prompt_pass_states_are_the_relayed_ones(chain, head, tokenizer)

        uncached_sent = middle["forward"].sent - before.get("forward", Traffic()).sent
        cached_sent = after["infer"].sent
        assert cached_sent < uncached_sent / 3, (cached_sent, uncached_sent)

        def end_on_the_second_range(inference):
            stage = inference.route[1]
            chain.call(stage, END_SESSION, chain.transport.meta(stage, session_id=inference.session_id))

        opened = _interrupt_after(chain, 5, end_on_the_second_range)
        refilled = generate_ids(chain, head, tokenizer, PROMPTS, NEW_TOKENS, kv_cache=True)
        assert refilled == uncached
        assert opened[0].refills == 1


def _prompt_pass_states_are_the_relayed_ones(chain, head, tokenizer):
    """What the live probe reads (coordinator.live_probe): the state at a stage boundary at each prompt's last token
    of generation's prompt pass, the same with and without the KV cache, and the same as the prompt alone
    (right-padded) gives there."""
    for index in (1, None):  # the second range's input; the chain's output
        boundary = Boundary(layer=chain.ranges[0][1] if index else chain.ranges[-1][1], blocks=chain.ranges[-1][1],
                            range_index=index)
        states = {}
        for kv_cache in (False, True):
            capture = BoundaryCapture(index)
            generate(chain, head, tokenizer, PROMPTS, 2, batch_size=4, kv_cache=kv_cache, capture=capture)
            states[kv_cache] = capture.states()
        alone = boundary_states(chain, head, [tokenizer.chat.prompt_ids(p) for p in PROMPTS], tokenizer.pad_id,
                                boundary, step=-1, batch_size=4)
        assert states[False].shape == (len(PROMPTS), alone.shape[1])
        torch.testing.assert_close(states[True], states[False], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[True], torch.from_numpy(alone), rtol=1e-4, atol=1e-4)


def test_the_replica_holding_a_session_is_killed_mid_answer_and_another_one_takes_it(tmp_path):
    job_file = write_job(tmp_path, swarm={"min_nodes": 4, "replicas": 2, "rpc_timeout_s": 30})
    run_dir = tmp_path / "run"
    with local_session(job_file, run_dir, nodes=4) as (prepared, session):
        chain, head, tokenizer = session.chain, session.head, prepared.tokenizer
        uncached = generate_ids(chain, head, tokenizer, PROMPTS, NEW_TOKENS, kv_cache=False)
        processes = {Identity.load_or_create(run_dir / "nodes" / f"node-{index}.key").fingerprint: process
                     for index, process in enumerate(session.local.processes)}
        killed = []

        def kill_the_first_ranges_replica(inference):
            stage = inference.route[0]
            processes[stage.node_id].send_signal(signal.SIGKILL)
            processes[stage.node_id].wait(timeout=30)
            killed.append(stage)

        opened = _interrupt_after(chain, 4, kill_the_first_ranges_replica)
        cached = generate_ids(chain, head, tokenizer, PROMPTS, NEW_TOKENS, kv_cache=True)
        assert cached == uncached
        assert opened[0].route[0] is not killed[0] and opened[0].route[0].range == killed[0].range
        assert killed[0] not in chain.stages
