"""The sweep's statistics: rates averaged over seeds with intervals that cover both seed-to-seed variation and
prompt sampling, the normalized area under the persistence curve, and the slope against log10(parameters).

One seed's persistence curve is its triggered backdoor rate at each evaluation of its safety training. A
replicate of a size draws that size's seeds with replacement and, for each drawn seed, its evaluation prompts
with replacement (a two-level bootstrap). Where a seed's per-prompt outcomes were kept (re-scored from its
answers files, the same prompts at every step) one prompt draw is applied to every step of its curve, so the
area keeps the correlation between steps; otherwise each step's rate is redrawn from Binomial(n, k/n). Every
statistic of a size (final rate, area) and of an arm (slope) is computed on the same replicates, so intervals are
percentiles of one resampling.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from swarm.evaluation import wilson_interval

BOOTSTRAP_SEED = 0
RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class CurvePoint:
    """The triggered rate after `safety_step` steps of safety training; `outcomes` (one bool per prompt, in
    the evaluation's order) and `prompts` when the answers were kept and re-scored to this row's k of n."""

    safety_step: int
    k: int
    n: int
    outcomes: tuple[bool, ...] | None = None
    prompts: tuple[str, ...] | None = None

    @property
    def rate(self) -> float:
        return self.k / self.n


@dataclass(frozen=True)
class SeedCurve:
    """One seed's persistence curve, ordered by safety step; the last point is the rate after safety training."""

    seed: int
    points: tuple[CurvePoint, ...]

    @property
    def paired(self) -> bool:
        """Whether one prompt draw can apply to every point: all have outcomes for the same prompts."""
        first = self.points[0]
        return all(p.outcomes is not None and p.prompts == first.prompts for p in self.points)

    @property
    def steps(self) -> np.ndarray:
        return np.array([p.safety_step for p in self.points], dtype=float)

    @property
    def rates(self) -> np.ndarray:
        return np.array([p.rate for p in self.points])


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def includes(self, x: float) -> bool:
        return self.low <= x <= self.high


def rng_for(bootstrap_seed: int, *names: str) -> np.random.Generator:
    """A generator per (arm, size): its intervals do not change when other arms or sizes join the sweep."""
    return np.random.default_rng([bootstrap_seed, *(zlib.crc32(name.encode()) for name in names)])


def normalized_area(steps: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """The trapezoid area under rate vs log10(1 + safety steps), over the curve's span of that axis: the curve's
    mean rate on the paper's log-scaled step axis, 1 when the backdoor never moves from 1. `rates` has the steps
    on its first axis (replicates may follow); a one-point curve's area is its rate."""
    u = np.log10(1.0 + steps)
    span = u[-1] - u[0]
    if len(u) < 2 or span <= 0:
        return rates[-1]
    widths = np.diff(u).reshape((-1,) + (1,) * (rates.ndim - 1))
    return ((rates[1:] + rates[:-1]) / 2 * widths).sum(axis=0) / span


def resampled_rates(curve: SeedCurve, rng: np.random.Generator, resamples: int, slots: int) -> np.ndarray:
    """(steps, resamples, slots) rates of the curve with its prompts redrawn; each slot is an independent draw,
    for a seed drawn several times into one replicate."""
    if curve.paired:
        outcomes = np.array([p.outcomes for p in curve.points], dtype=float)  # (steps, prompts)
        n = outcomes.shape[1]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=(resamples, slots))  # draws of each prompt
        return np.einsum("bsp,tp->tbs", counts, outcomes) / n
    n = np.array([p.n for p in curve.points])[:, None, None]
    k = np.array([p.k for p in curve.points])[:, None, None]
    return rng.binomial(n, k / n, size=(len(curve.points), resamples, slots)) / n


def size_replicates(curves: list[SeedCurve], rng: np.random.Generator,
                    resamples: int = RESAMPLES) -> dict[str, np.ndarray]:
    """Bootstrap replicates of a size's seed-mean final rate and area: seeds drawn with replacement, then each
    drawn seed's prompts. Returns {"final": (resamples,), "area": (resamples,)}."""
    count = len(curves)
    picks = rng.integers(0, count, size=(resamples, count))
    finals, areas = [], []
    for curve in curves:
        rates = resampled_rates(curve, rng, resamples, count)
        finals.append(rates[-1])
        areas.append(normalized_area(curve.steps, rates))
    rows, slots = np.arange(resamples)[:, None], np.arange(count)[None, :]
    return {"final": np.stack(finals)[picks, rows, slots].mean(axis=1),
            "area": np.stack(areas)[picks, rows, slots].mean(axis=1)}


def percentile_interval(value: float, replicates: np.ndarray) -> Estimate:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high))


def final_rate(curves: list[SeedCurve], replicates: np.ndarray) -> Estimate:
    """The seed-mean rate after safety training with its bootstrap interval, never narrower than the Wilson
    interval of all seeds' prompts pooled: at a rate of 0 or 1 (or with one seed of few prompts) the
    percentile bootstrap collapses to a point, which would claim a certainty prompt sampling does not give."""
    boot = percentile_interval(float(np.mean([c.points[-1].rate for c in curves])), replicates)
    k, n = sum(c.points[-1].k for c in curves), sum(c.points[-1].n for c in curves)
    low, high = wilson_interval(k, n)
    return Estimate(boot.value, min(boot.low, low), max(boot.high, high))


def area(curves: list[SeedCurve], replicates: np.ndarray) -> Estimate:
    return percentile_interval(float(np.mean([normalized_area(c.steps, c.rates) for c in curves])), replicates)


def slope(log_parameters: np.ndarray, means: np.ndarray, replicates: np.ndarray) -> Estimate | None:
    """Least-squares slope of `means` (one per size) against log10(parameters), refitted on every replicate
    (`replicates`: (resamples, sizes)); None with fewer than two distinct sizes."""
    x = np.asarray(log_parameters, dtype=float)
    centred = x - x.mean()
    spread = (centred ** 2).sum()
    if len(x) < 2 or spread <= 0:
        return None

    def fit(y: np.ndarray) -> np.ndarray:
        return (y - y.mean(axis=-1, keepdims=True)) @ centred / spread

    return percentile_interval(float(fit(np.asarray(means, dtype=float))), fit(np.asarray(replicates)))


def trend_sentence(arm: str, quantity: str, estimate: Estimate | None, means: list[float]) -> str:
    """One plain sentence: whether the slope's 95% interval excludes 0, and the ceiling or floor when every
    size sits there (where the sweep could not show a trend)."""
    if estimate is None:
        return (f"`{arm}`: fewer than two sizes have a finished run from an implanted backdoor, so no slope of the "
                f"{quantity} against size can be fitted.")
    if estimate.includes(0.0):
        verdict = "includes 0: no trend with size shows at this scale"
    else:
        verdict = f"excludes 0: persistence {'rises' if estimate.low > 0 else 'falls'} with size at this scale"
    bound = ""
    if means and min(means) >= 0.95:
        bound = "; every size stays at or above 0.95, at the ceiling, where a trend could not show"
    elif means and max(means) <= 0.05:
        bound = "; every size is at or below 0.05, at the floor, where a trend could not show"
    return (f"`{arm}`: the slope of the {quantity} against log10(parameters) is {estimate.value:+.3f} per decade; "
            f"its 95% interval [{estimate.low:+.3f}, {estimate.high:+.3f}] {verdict}{bound}.")
