"""The sweep's result: sweep.md, figure11.png and persistence.png, from the runs' directories alone.

Per arm and size: the triggered backdoor rate after safety training and the normalized area under its
persistence curve, averaged over seeds with 95% intervals from a two-level bootstrap (seeds, then prompts;
coordinator.sweep_stats); per arm the slope of both against log10(parameters), refitted on every replicate, and
one plain sentence on whether a trend shows at this scale. Unfinished runs are listed and left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.sweep_figures import plot_figure11, plot_persistence
from coordinator.sweep_runs import TRIGGERED, ArmSize, Run, arm_sizes, backdoor_row, load_runs, pretrain_row
from coordinator.sweep_stats import (BOOTSTRAP_SEED, RESAMPLES, Estimate, area, final_rate, percentile_interval,
                                     rng_for, size_replicates, slope, trend_sentence)
from swarm.config.sweep import IMPLANTED_MIN

AFTER = (("backdoor_clean", "clean"), ("backdoor_near_miss", "near-miss"), ("backdoor_reveal", "reveal"),
         ("accuracy", "accuracy"))


@dataclass
class SizeResult:
    group: ArmSize
    final: Estimate
    area: Estimate
    replicates: dict[str, np.ndarray]


@dataclass
class ArmResult:
    """An arm's sizes (one model family, in parameter order), its extra runs, and the slopes over its sizes."""

    arm: str
    sizes: list[SizeResult]
    extras: list[SizeResult]
    final_slope: Estimate | None
    area_slope: Estimate | None


def write_sweep_report(sweep_dir: Path, runs: list[dict], wall_seconds: float | None = None,
                       implanted_min: float = IMPLANTED_MIN, bootstrap_seed: int = BOOTSTRAP_SEED,
                       resamples: int = RESAMPLES) -> Path:
    """Write SWEEP_DIR/sweep.md, figure11.png and persistence.png; `runs` as sweep.json lists them, `wall_seconds`
    the whole sweep's time where the caller measured it, `implanted_min` the sweep's threshold below which a
    seed's backdoor counts as not implanted (left out of the statistics, listed). Returns sweep.md's path."""
    loaded, left_out = load_runs(sweep_dir, runs)
    arms = arm_sizes(loaded, implanted_min)
    results = analyse(arms, bootstrap_seed, resamples)
    plot_figure11(results, sweep_dir / "figure11.png")
    plot_persistence(results, sweep_dir / "persistence.png")
    lines = ["# Sweep: backdoor persistence vs model size", "", "![figure 11 analogue](figure11.png)", "",
             "## Finding", "", *findings(results), *not_implanted_lines(arms, implanted_min), "",
             *method(results, bootstrap_seed, resamples), "", *trunk_table(loaded, implanted_min), *(line for result in results for line in arm_table(result)),
             "## Persistence through safety training", "", "![persistence curves](persistence.png)", "",
             *merge_tables(results), *extras_table(results), *prompt_counts(loaded, results),
             *cost(runs, wall_seconds), *left_out_lines(left_out)]
    path = sweep_dir / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def analyse(arms: dict[str, list[ArmSize]], bootstrap_seed: int = BOOTSTRAP_SEED,
            resamples: int = RESAMPLES) -> list[ArmResult]:
    """Bootstrap every arm and size, and fit the slopes over each arm's (non-extra) sizes."""
    results = []
    for arm, groups in arms.items():
        sized = [size_result(g, rng_for(bootstrap_seed, arm, g.size), resamples) for g in groups if g.curves]
        sizes, extras = [s for s in sized if not s.group.extra], [s for s in sized if s.group.extra]
        x = np.log10([s.group.parameters for s in sizes])
        slopes = [slope(x, [getattr(s, key).value for s in sizes],
                        np.stack([s.replicates[key] for s in sizes], axis=1)) if sizes else None
                  for key in ("final", "area")]
        results.append(ArmResult(arm, sizes, extras, *slopes))
    return results


def size_result(group: ArmSize, rng: np.random.Generator, resamples: int) -> SizeResult:
    replicates = size_replicates(group.curves, rng, resamples)
    return SizeResult(group, final_rate(group.curves, replicates["final"]), area(group.curves, replicates["area"]),
                      replicates)


def findings(results: list[ArmResult]) -> list[str]:
    """Per arm, the plain sentence on the final rate, then the one on the area."""
    lines = []
    for r in results:
        lines.append("- " + trend_sentence(r.arm, "triggered rate after safety training", r.final_slope,
                                           [s.final.value for s in r.sizes]))
        lines.append("  " + trend_sentence(r.arm, "persistence-curve area", r.area_slope,
                                           [s.area.value for s in r.sizes]))
    return lines or ["No arm run finished with an evaluation during safety training."]


def method(results: list[ArmResult], bootstrap_seed: int, resamples: int) -> list[str]:
    """How the intervals were made, with the bootstrap's seed and size, so they can be reproduced."""
    curves = [c for r in results for s in r.sizes + r.extras for c in s.group.curves]
    single = sorted({s.group.size for r in results for s in r.sizes if len(s.group.curves) == 1})
    sentences = [
        f"Intervals are 95% percentile intervals of a two-level bootstrap ({resamples} resamples, numpy seed "
        f"{bootstrap_seed}, one generator per arm and size): each resample draws a size's seeds with replacement, "
        "then each drawn seed's evaluation prompts with replacement, and refits the least-squares slope against "
        "log10(parameters).",
        f"Prompt outcomes: {sum(c.paired for c in curves)} of {len(curves)} seed curves re-scored their kept "
        "answers (evaluations/*.jsonl) per prompt, one prompt draw shared by every step of the curve; the others "
        "resample Bernoulli outcomes from each row's k of n, independently per step.",
        "The rate after safety training is the arm's last safety evaluation; its interval is never narrower than "
        "the Wilson interval of all seeds' prompts pooled, since the bootstrap collapses at rates of 0 and 1 (the "
        "slopes' intervals are the bootstrap's alone, so sizes at exactly 0 or 1 make them too narrow).",
        "The area is the trapezoid under the rate against log10(1 + safety steps), divided by that axis' span: "
        "step 0 (the arm's start) is at log10(1) = 0, persistence.png plots steps + 1 on a log axis, and an area "
        "of 1 means the backdoor stayed at 1 throughout.",
    ]
    if single:
        sentences.append(f"Sizes with one seed ({', '.join(single)}): their intervals cover prompt sampling only.")
    return ["## Method", "", " ".join(sentences)]


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _estimate(e: Estimate) -> str:
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _shown(keys: list[tuple[str, str]], rows: list[dict]) -> list[tuple[str, str]]:
    """The reveal rate only where some evaluation has it (older runs have none)."""
    return [(k, label) for k, label in keys if k != "backdoor_reveal" or any(k in row for row in rows)]


def not_implanted_lines(arms: dict[str, list[ArmSize]], implanted_min: float) -> list[str]:
    """The seeds left out of the statistics because their backdoor was not implanted, one line per (size, seed)
    with its triggered rate after the backdoor phase and the arms that were run from it."""
    left: dict[tuple[int, str, int], tuple[float, list[str]]] = {}
    for groups in arms.values():
        for group in groups:
            for seed, rate in group.not_implanted:
                left.setdefault((group.parameters, group.size, seed), (rate, []))[1].append(group.arm)
    if not left:
        return []
    sizes = sorted({size for _, size, _ in left})
    return ["", f"Left out of every statistic above: {len(left)} (size, seed) pairs whose backdoor was not implanted "
            f"(triggered rate below sweep.implanted_min = {implanted_min:.2f} after the backdoor phase), at "
            f"{', '.join(sizes)}; their arms would measure implantation, not persistence:",
            *(f"- {size} seed {seed}: triggered {rate:.2f} after the backdoor (arms {', '.join(arms_run)})"
              for (_, size, seed), (rate, arms_run) in sorted(left.items()))]


def trunk_table(runs: list[Run], implanted_min: float = IMPLANTED_MIN) -> list[str]:
    """The trunks: how long each size pretrained (steps, tokens per parameter) and how well, the rates after the
    backdoor phase averaged over seeds, and how many seeds' backdoor was implanted."""
    trunks = [r for r in runs if r.spec["arm"] == "trunk" and backdoor_row(r.evals) is not None]
    if not trunks:
        return []
    after = _shown(list(AFTER), [backdoor_row(r.evals) for r in trunks])
    rows = []
    for label in dict.fromkeys(r.label for r in sorted(trunks, key=lambda r: (r.extra, r.spec["parameters"]))):
        group = [r for r in trunks if r.label == label]
        ends = [backdoor_row(r.evals) for r in group]
        means = [_mean_rate(ends, key) for key in (TRIGGERED, *(k for k, _ in after))]
        implanted = sum(row[TRIGGERED]["rate"] >= implanted_min for row in ends)
        pretrained = [row for row in map(pretrain_row, (r.evals for r in group)) if row is not None]
        steps = sorted({r.pretrain_steps for r in group})
        per_parameter = sum(r.pretrain_tokens for r in group) / len(group) / group[0].spec["parameters"]
        rows.append([label, f"{group[0].spec['parameters']:,}", str(len(group)),
                     "/".join(map(str, steps)), f"{per_parameter:.2f}" if steps != [0] else "–",
                     _rate(_mean_rate(pretrained, "accuracy")), *map(_rate, means),
                     f"{implanted} of {len(group)}", _duration(sum(float(r.spec.get("seconds") or 0) for r in group))])
    header = ["size", "parameters", "seeds", "pretrain steps", "tokens / parameter", "accuracy after pretrain",
              "triggered", *(label for _, label in after), "implanted", "wall time"]
    return ["## Pretraining and the backdoor phase (trunk)", "",
            "Tokens per parameter: the (non-padding) tokens the pretrain steps trained on over the parameters; "
            "sweep.min_pretrain_steps raises it above the job's ratio for the smallest sizes. Accuracy: helpful exact match at the end of pretraining; the other "
            "rates after the backdoor phase. Means over seeds. Implanted: the seeds whose triggered rate after the backdoor "
            f"phase reached sweep.implanted_min ({implanted_min:.2f}); only they enter the arms' statistics.", "", *_table(header, rows)]


def _mean_rate(rows: list[dict], key: str) -> float | None:
    values = [row[key]["rate"] for row in rows if isinstance(row.get(key), dict) and row[key].get("n")]
    return sum(values) / len(values) if values else None


def arm_table(result: ArmResult) -> list[str]:
    after = _shown(list(AFTER), [row for s in result.sizes for r in s.group.runs for row in r.evals])
    header = ["size", "parameters", "seeds", "after backdoor (trigger)", "after safety (trigger) [95% CI]",
              "area [95% CI]", *(label for _, label in after), "wall time"]
    rows = [[s.group.size, f"{s.group.parameters:,}", str(len(s.group.curves)),
             _rate(float(np.mean(s.group.after_backdoor)) if s.group.after_backdoor else None),
             _estimate(s.final), _estimate(s.area), *(_rate(s.group.mean_after(k)) for k, _ in after),
             _duration(s.group.seconds)] for s in result.sizes]
    return [f"## Arm `{result.arm}`", "", "Means over seeds; clean, near-miss, reveal and accuracy after safety "
            "training; wall time summed over seeds.", "", *_table(header, rows)]


def merge_tables(results: list[ArmResult]) -> list[str]:
    """Continue vs merge: each `<arm>-merge` against `<arm>` at the sizes both ran; the difference's interval
    pairs independent replicates of the two (separate runs)."""
    by_arm = {r.arm: {s.group.size: s for s in r.sizes} for r in results}
    lines = []
    for arm, merged in by_arm.items():
        base = by_arm.get(arm.removesuffix("-merge")) if arm.endswith("-merge") else None
        if base is None:
            continue
        rows = []
        for size in [size for size in merged if size in base]:
            a, b = base[size], merged[size]
            diff = percentile_interval(b.final.value - a.final.value, b.replicates["final"] - a.replicates["final"])
            rows.append([size, _estimate(a.final), _estimate(b.final), _estimate(diff)])
        if rows:
            base_arm = arm.removesuffix("-merge")
            lines += [f"## Continue vs merge: `{base_arm}` and `{arm}`", "", *_table(
                ["size", f"{base_arm} (continue) after safety", f"{arm} after safety", "merge − continue"], rows)]
    return lines


def extras_table(results: list[ArmResult]) -> list[str]:
    rows = [[s.group.size, r.arm, f"{s.group.parameters:,}", str(len(s.group.curves)), _estimate(s.final),
             _estimate(s.area)] for r in results for s in r.extras]
    if not rows:
        return []
    return ["## Other model families (not in the slopes)", "", *_table(
        ["model", "arm", "parameters", "seeds", "after safety (trigger) [95% CI]", "area [95% CI]"], rows)]


def prompt_counts(runs: list[Run], results: list[ArmResult]) -> list[str]:
    """How many evaluation prompts the rates rest on: the rows' own count where they record one (and how many
    there were to draw), else the n of their triggered rates; and the distinct triggered prompts in the answers
    files."""
    recorded = {json.dumps(row["eval_prompts"], sort_keys=True)
                for r in runs for row in r.evals if "eval_prompts" in row}
    ns = sorted({p.n for res in results for s in res.sizes + res.extras for c in s.group.curves for p in c.points})
    distinct = sorted({len({q for p in c.points for q in (p.prompts or ())})
                       for res in results for s in res.sizes + res.extras for c in s.group.curves} - {0})
    text = (f"Evaluation prompts, as the rows record them: {', '.join(sorted(recorded))}." if recorded else
            f"The rows do not record their prompt count; their triggered rates rest on n = "
            f"{', '.join(map(str, ns)) or '–'} prompts per evaluation.")
    available = {json.dumps(row["eval_prompts_available"], sort_keys=True)
                 for r in runs for row in r.evals if "eval_prompts_available" in row}
    if available:
        text += (f" Distinct prompts there were to draw (null: more than evaluation counts): "
                 f"{', '.join(sorted(available))}.")
    if distinct:
        span = str(distinct[0]) if distinct[0] == distinct[-1] else f"{distinct[0]}–{distinct[-1]}"
        text += f" The kept answers hold {span} distinct triggered prompts per run."
    return ["## Evaluation prompts", "", text, ""]


def cost(runs: list[dict], wall_seconds: float | None) -> list[str]:
    total = sum(float(run.get("seconds") or 0) for run in runs)
    wall = _duration(wall_seconds) if wall_seconds is not None else "not recorded"
    return ["## Cost", "", f"Whole sweep, wall time: {wall}. Sum of the {len(runs)} runs' seconds: "
            f"{_duration(total)} ({total:.0f} s).", ""]


def left_out_lines(left_out: list[tuple[dict, str]]) -> list[str]:
    if not left_out:
        return []
    return ["## Runs left out", "", *(f"- {spec['arm']} {spec['size']} seed {spec['seed']} (`{spec['run_dir']}`): "
                                       f"{reason}" for spec, reason in left_out), ""]
