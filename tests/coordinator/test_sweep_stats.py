import math

import numpy as np
import pytest

from coordinator.sweep_stats import (CurvePoint, SeedCurve, area, final_rate, normalized_area, resampled_rates, rng_for,
                                     size_replicates, slope, trend_sentence)
from swarm.evaluation import wilson_interval


def _curve(seed, *points, paired=False):
    """`points`: (safety_step, k, n); paired curves carry outcomes for the same prompts at every step."""
    made = []
    for step, k, n in points:
        outcomes = tuple([True] * k + [False] * (n - k)) if paired else None
        made.append(CurvePoint(step, k, n, outcomes, tuple(f"p{i}" for i in range(n)) if paired else None))
    return SeedCurve(seed, tuple(made))


def _final(curves, seed=0, resamples=2000):
    replicates = size_replicates(curves, rng_for(seed, "arm", "size"), resamples)
    return final_rate(curves, replicates["final"]), replicates


@pytest.mark.parametrize("paired", [True, False])
def test_identical_seeds_collapse_to_the_prompt_level_interval(paired):
    curves = [_curve(seed, (0, 64, 64), (100, 32, 64), paired=paired) for seed in range(3)]
    estimate, replicates = _final(curves)
    half = 1.96 * math.sqrt(0.25 / 192)  # prompts alone: 3 seeds × 64 prompts at 0.5
    assert estimate.value == 0.5
    assert estimate.low == pytest.approx(0.5 - half, abs=0.015)
    assert estimate.high == pytest.approx(0.5 + half, abs=0.015)
    assert np.std(replicates["final"]) == pytest.approx(math.sqrt(0.25 / 192), rel=0.1)


def test_seed_to_seed_variation_widens_the_interval_beyond_prompt_sampling():
    curves = [_curve(seed, (0, 64, 64), (100, k, 64)) for seed, k in enumerate((13, 32, 51))]
    estimate, _ = _final(curves)
    low, high = wilson_interval(96, 192)
    assert estimate.value == pytest.approx(0.5)
    assert estimate.high - estimate.low > 2 * (high - low)


@pytest.mark.parametrize("k", [0, 64])
def test_rates_of_zero_and_one_keep_the_pooled_wilson_interval(k):
    curves = [_curve(seed, (0, 64, 64), (100, k, 64), paired=True) for seed in range(3)]
    estimate, replicates = _final(curves)
    low, high = wilson_interval(3 * k, 192)
    assert (estimate.value, estimate.low, estimate.high) == (k / 64, low, high)
    assert np.all(np.isfinite(replicates["area"]))
    assert area(curves, replicates["area"]).value == pytest.approx(normalized_area(np.array([0.0, 100.0]),
                                                                                 np.array([1.0, k / 64])))


def test_area_is_the_mean_rate_on_log_steps():
    assert normalized_area(np.array([0.0, 9.0, 99.0]), np.array([1.0, 1.0, 0.0])) == pytest.approx(0.75)
    assert normalized_area(np.array([50.0]), np.array([0.4])) == pytest.approx(0.4)


def test_a_paired_curve_shares_one_prompt_draw_across_its_steps():
    curve = _curve(0, (0, 20, 64), (10, 20, 64), paired=True)
    rates = resampled_rates(curve, np.random.default_rng(1), 500, 2)
    assert np.array_equal(rates[0], rates[1]) and rates[0].std() > 0
    unpaired = resampled_rates(_curve(0, (0, 20, 64), (10, 20, 64)), np.random.default_rng(1), 500, 2)
    assert not np.array_equal(unpaired[0], unpaired[1])


def test_the_same_bootstrap_seed_gives_the_same_interval():
    curves = [_curve(seed, (0, 64, 64), (100, k, 64)) for seed, k in enumerate((20, 30))]
    assert _final(curves, seed=3)[0] == _final(curves, seed=3)[0]
    assert _final(curves, seed=3)[0] != _final(curves, seed=4)[0]


def _sweep_slope(rate_of_size, seed_spread, n=128, sizes=5):
    """Sizes 10^6 … 10^(5+sizes) with three seeds each around rate_of_size(index)."""
    x, means, replicates = np.arange(6.0, 6.0 + sizes), [], []
    for index in range(sizes):
        ks = [round(n * min(1.0, max(0.0, rate_of_size(index) + d))) for d in seed_spread]
        curves = [_curve(seed, (0, n, n), (100, k, n)) for seed, k in enumerate(ks)]
        reps = size_replicates(curves, rng_for(0, "sft", str(index)), 2000)
        means.append(np.mean([c.points[-1].rate for c in curves]))
        replicates.append(reps["final"])
    return slope(x, means, np.stack(replicates, axis=1)), means


def test_a_linear_trend_gives_a_slope_interval_excluding_zero():
    estimate, means = _sweep_slope(lambda i: 0.1 + 0.2 * i, (-0.03, 0.0, 0.03))
    assert estimate.value == pytest.approx(0.2, abs=0.01) and estimate.low > 0
    assert "excludes 0: persistence rises with size" in trend_sentence("sft", "rate", estimate, means)
    falling, means = _sweep_slope(lambda i: 0.9 - 0.2 * i, (-0.03, 0.0, 0.03))
    assert falling.high < 0
    assert "excludes 0: persistence falls with size" in trend_sentence("sft", "rate", falling, means)


def test_a_flat_noisy_sweep_gives_a_slope_interval_including_zero():
    noise = [0.05, -0.1, 0.1, -0.05, 0.0]
    estimate, means = _sweep_slope(lambda i: 0.5 + noise[i], (-0.3, 0.0, 0.3))
    assert estimate.includes(0.0)
    assert "includes 0: no trend with size shows at this scale" in trend_sentence("sft", "rate", estimate, means)


def test_the_sentence_names_the_ceiling_and_a_missing_slope():
    estimate, means = _sweep_slope(lambda i: 1.0, (0.0, 0.0, 0.0))
    sentence = trend_sentence("sft", "rate", estimate, means)
    assert "includes 0" in sentence and "at the ceiling" in sentence
    assert "fewer than two sizes" in trend_sentence("rl", "rate", None, [0.5])
    assert slope(np.array([6.0]), [0.5], np.zeros((10, 1))) is None
