"""A stream's traffic: counted as it moves, summed over stages and rows, written and read back as JSON."""

from __future__ import annotations

import json

from swarm.traffic import Traffic, carried_between, per_stream_from_json, per_stream_json, total_per_stream


def test_a_count_adds_each_direction_on_its_own():
    traffic = Traffic()
    traffic.add(sent=10)
    traffic.add(received=3)
    traffic.add(5, 7)
    assert (traffic.sent, traffic.received) == (15, 10)


def test_sums_and_differences_are_new_values_so_a_total_taken_earlier_stays_as_it_was():
    running = Traffic(1, 2)
    total = running + Traffic()
    running.add(100, 100)
    assert total == Traffic(1, 2) and running - total == Traffic(100, 100)


def test_the_total_per_stream_sums_over_counts_that_need_not_share_their_streams():
    stages = [{"forward": Traffic(10, 20), "step": Traffic(1, 2)}, {"forward": Traffic(5, 5), "average": Traffic(7, 0)}]
    totals = total_per_stream(stages)
    assert totals == {"forward": Traffic(15, 25), "step": Traffic(1, 2), "average": Traffic(7, 0)}
    stages[0]["forward"].add(1000, 1000)
    assert totals["forward"] == Traffic(15, 25)  # not the stage's own counter


def test_what_streams_carried_between_two_totals_leaves_out_those_that_carried_nothing_in_name_order():
    before = {"forward": Traffic(10, 10), "step": Traffic(3, 3)}
    after = {"step": Traffic(3, 3), "forward": Traffic(25, 12), "backward": Traffic(4, 0)}
    carried = carried_between(before, after)
    assert carried == {"backward": Traffic(4, 0), "forward": Traffic(15, 2)}
    assert list(carried) == ["backward", "forward"]


def test_the_json_form_is_sent_then_received_and_reads_back_with_a_missing_direction_as_zero():
    assert json.dumps(per_stream_json({"forward": Traffic(15, 2)})) == '{"forward": {"sent": 15, "received": 2}}'
    assert per_stream_from_json({"forward": {"sent": 15, "received": 2}, "average": {"sent": 4}}) == {
        "forward": Traffic(15, 2), "average": Traffic(4, 0)}
