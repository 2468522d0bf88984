"""The node's first announcement of its blocks (node.join): a store the DHT refuses while the node is still
meeting its neighbours is tried again, and only a DHT that keeps refusing fails the join."""

from __future__ import annotations

from node import join


def test_the_first_announcement_is_tried_again_until_the_dht_takes_it(monkeypatch):
    monkeypatch.setattr(join, "ANNOUNCE_RETRY_S", 0.0)
    answers = [False, False, True]
    assert join._announced_at_start(lambda: answers.pop(0))
    assert answers == []


def test_a_dht_that_keeps_refusing_fails_the_announcement_after_every_attempt(monkeypatch):
    monkeypatch.setattr(join, "ANNOUNCE_RETRY_S", 0.0)
    tried = []
    assert not join._announced_at_start(lambda: tried.append(1) or False)
    assert len(tried) == join.ANNOUNCE_ATTEMPTS
