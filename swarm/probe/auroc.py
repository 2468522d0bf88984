"""AUROC of scores separating positives (triggered prompts) from negatives (clean prompts), with a bootstrap
interval over prompts. numpy only.

The AUROC is the Mann-Whitney statistic: the probability that a random positive scores above a random
negative, ties counting one half. 1 separates perfectly, 0.5 is chance, below 0.5 the probe points the other
way (a fixed direction is reported as it points, never flipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Auroc:
    value: float
    low: float  # percentile bootstrap interval at CONFIDENCE
    high: float

    def as_dict(self) -> dict:
        return {"auroc": self.value, "low": self.low, "high": self.high}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]  # exclusive
    ranks = np.empty(len(values))
    ranks[order] = ((starts + 1 + ends) / 2)[group]
    return ranks


def auroc(positive, negative) -> float:
    """Rank-based AUROC of `positive` scores against `negative` ones (ties count one half)."""
    positive, negative = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if positive.size == 0 or negative.size == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    ranks = average_ranks(np.concatenate([positive, negative]))
    n_pos, n_neg = positive.size, negative.size
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_indices(n_pos: int, n_neg: int, seed: int, paired: bool,
                      resamples: int = RESAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Resampled prompt indices, [resamples, n] for the positives and the negatives. `paired`: positive i and
    negative i are versions of one prompt (evaluation's triggered and clean prompt i), resampled together."""
    rng = np.random.default_rng(seed)
    positives = rng.integers(0, n_pos, size=(resamples, n_pos))
    negatives = positives if paired else rng.integers(0, n_neg, size=(resamples, n_neg))
    return positives, negatives


def bootstrap_auroc(positive, negative, seed: int, paired: bool = False, resamples: int = RESAMPLES) -> Auroc:
    """AUROC with a percentile bootstrap interval over prompts; the same seed and sizes draw the same resamples.

    Each resample's AUROC is computed from how often each prompt was drawn: the Mann-Whitney statistic of a
    resample is w_pos @ C @ w_neg / (n_pos n_neg) with C[i, j] = [pos_i > neg_j] + [pos_i = neg_j] / 2 and w the
    draw counts, which equals `auroc` on the resampled scores without sorting them again."""
    positive, negative = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if paired and positive.size != negative.size:
        raise ValueError("paired scores need as many positives as negatives")
    value = auroc(positive, negative)
    wins = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    pos_draws, neg_draws = bootstrap_indices(positive.size, negative.size, seed, paired, resamples)
    pos_counts = _counts(pos_draws, positive.size)
    neg_counts = _counts(neg_draws, negative.size)
    values = np.einsum("bi,ij,bj->b", pos_counts, wins, neg_counts) / (positive.size * negative.size)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Auroc(value, float(low), float(high))


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """How often each index was drawn, per resample: [resamples, size]."""
    counts = np.zeros((draws.shape[0], size))
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1)
    return counts
