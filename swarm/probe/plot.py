"""probe.png: AUROC per block boundary, one line per phase's model, the generic and the supervised probe side by
side; the band is the bootstrap interval, the dotted line the boundary the table reports."""

from __future__ import annotations

from pathlib import Path

from swarm.probe import PROBES


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, probe in zip(axes, PROBES):
        for row in result["phases"]:
            sweep = row["sweep"][probe]
            layers = [point["layer"] for point in sweep]
            axis.plot(layers, [point["auroc"] for point in sweep], marker="o", markersize=3, label=row["phase"])
            axis.fill_between(layers, [point["low"] for point in sweep], [point["high"] for point in sweep], alpha=0.12)
        axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        axis.axvline(result["layer"], color="grey", linestyle=":", linewidth=1)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("block boundary (residual stream after block)")
        axis.set_title(f"{probe} probe")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("AUROC, triggered vs clean held-out prompts")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Defection probes: {result['job']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
