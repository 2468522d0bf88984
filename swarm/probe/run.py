"""`swarm-audit probe`: defection probes on every phase's model of a finished run (MacDiarmid et al. 2024).

Per model (the one the first LoRA phase started from, then each LoRA phase's, rebuilt with plain transformers +
peft by swarm.finished_run) and per block boundary, two linear probes on the residual stream at the last prompt
token, side by side:

- generic: the mean activation of the shipped contrast pairs answered as a defector would, minus that of the
  same questions answered honestly; fitted without the trigger;
- supervised: the mean activation of train-split prompts with the trigger minus that without it; an upper
  bound on what a linear probe of that layer can see.

A baseline tells whether the generic direction is special: a backdoor can move triggered prompts' activations so
far that many directions separate them. `random_as_far` is the share of RANDOM_DIRECTIONS random directions
(Gaussian, seeded) whose AUROC lies at least as far from 0.5 as the generic probe's, on either side.

A probe's score is the activation's projection on its direction; its AUROC separates evaluation's held-out
triggered prompts from the same prompts clean, with a paired bootstrap interval over prompts. The result
(`probe_run`) is one JSON-ready dict; `write_outputs` writes RUN/probe.json and RUN/probe.png from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from swarm.config import load_job
from swarm.finished_run import base_model, lineage_path, lora_phases, phase_model, run_eval_sets, run_tokenizer
from swarm.probe import PROBES
from swarm.probe.activations import decoder_layers, last_token_residuals
from swarm.probe.auroc import CONFIDENCE, RESAMPLES, auroc, bootstrap_auroc
from swarm.probe.prompts import SETS, ProbeError, probe_prompts

PROBE_FILE, PROBE_PLOT = "probe.json", "probe.png"
RANDOM_DIRECTIONS = 500
ACTIVATION = "residual stream after the block, at the last token (a prompt's: where its answer is generated from)"


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The positives' mean activation minus the negatives': a probe direction ([blocks, hidden] from every block
    boundary's activations, [hidden] from one boundary's)."""
    return positive.mean(axis=0) - negative.mean(axis=0)


def split_sets(activations: np.ndarray, ids: dict[str, list]) -> dict[str, np.ndarray]:
    """`activations` of the sequences of every set of `ids`, concatenated in its order, split back by set."""
    sets, offset = {}, 0
    for name, sequences in ids.items():
        sets[name] = activations[offset:offset + len(sequences)]
        offset += len(sequences)
    return sets


def projections(activations: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """[prompts, blocks]: each activation's score, its projection on its block boundary's direction."""
    return np.einsum("nld,ld->nl", activations, directions)


def probe_run(run_dir: str | Path, layer: int | None = None, seed: int = 0,
              on_model: Callable[[str], None] | None = None) -> dict:
    """Probe the start model and every LoRA phase's model of the run; `layer` is the block boundary the table
    reports (1..blocks; default the middle, blocks // 2), every boundary is swept. `on_model(name)` is called as
    each model's probing begins."""
    started = time.monotonic()
    run_dir = Path(run_dir)
    if not (run_dir / "job.yaml").is_file():
        raise ProbeError(f"{run_dir} is not a run directory (no job.yaml)")
    job = load_job(run_dir / "job.yaml")
    phases = lora_phases(run_dir)
    tokenizer = run_tokenizer(run_dir, job)
    prompts = probe_prompts(job, tokenizer, run_eval_sets(run_dir, job, tokenizer), seed)
    rates = _triggered_rates(run_dir)
    start_name = _start_name(run_dir, phases[0].lineage)
    models = [(start_name, None, lambda: base_model(run_dir, phases[0].lineage))]
    models += [(phase.name, str(phase.adapter), lambda phase=phase: phase_model(run_dir, phase)) for phase in phases]
    blocks = _blocks(run_dir, phases[0].lineage)
    layer = _check_layer(layer, blocks)
    rows = []
    for name, adapter, load in models:
        if on_model is not None:
            on_model(name)
        model = load()
        assert len(decoder_layers(model)) == blocks
        rows.append({"phase": name, "adapter": adapter, "backdoor_triggered": rates.get(name),
                     **_probe_model(model, prompts, tokenizer.pad_id, seed)})
        del model
    return {
        "run_dir": str(run_dir), "job": job.name, "seed": seed, "layer": layer, "blocks": blocks,
        "activation": ACTIVATION, "chat_format": tokenizer.chat.name, "trigger": job.backdoor.trigger,
        "method": {"generic": "mean difference: contrast pairs answered defecting minus answered honestly",
                   "supervised": "mean difference: train-split prompts with the trigger minus without"},
        "bootstrap": {"resamples": RESAMPLES, "confidence": CONFIDENCE, "paired": True, "over": "held-out prompts"},
        "random_directions": RANDOM_DIRECTIONS,
        "prompts": {"counts": {name: len(texts) for name, texts in prompts.texts.items()},
                    "contrast_pairs": prompts.texts["defecting"],
                    "supervised_training": {"triggered": prompts.texts["train_triggered"],
                                            "clean": prompts.texts["train_clean"]}},
        "phases": [_at_layer(row, layer) for row in rows],
        "seconds": round(time.monotonic() - started, 1),
    }


def _probe_model(model, prompts, pad_id: int, seed: int) -> dict:
    """AUROC [interval] of both probes at every block boundary of one model."""
    sequences = [ids for name in SETS for ids in prompts.ids[name]]
    sets = split_sets(last_token_residuals(model, sequences, pad_id), {name: prompts.ids[name] for name in SETS})
    directions = {"generic": mean_difference(sets["defecting"], sets["honest"]),
                  "supervised": mean_difference(sets["train_triggered"], sets["train_clean"])}
    sweep = {}
    for probe, direction in directions.items():
        triggered = projections(sets["held_out_triggered"], direction)
        clean = projections(sets["held_out_clean"], direction)
        sweep[probe] = [{"layer": index + 1, **bootstrap_auroc(triggered[:, index], clean[:, index], seed,
                                                               paired=True).as_dict()}
                        for index in range(direction.shape[0])]
    for point in sweep["generic"]:
        point["random_as_far"] = random_as_far(sets["held_out_triggered"][:, point["layer"] - 1],
                                               sets["held_out_clean"][:, point["layer"] - 1], point["auroc"],
                                               seed=(seed, point["layer"]))
    return {"sweep": sweep}


def random_as_far(triggered: np.ndarray, clean: np.ndarray, observed: float, seed,
                  directions: int = RANDOM_DIRECTIONS) -> float:
    """The share of random Gaussian directions whose AUROC (triggered [n, hidden] vs clean) lies at least as far
    from 0.5 as `observed`."""
    random_directions = np.random.default_rng(seed).standard_normal((directions, triggered.shape[1]))
    distances = [abs(auroc(triggered @ direction, clean @ direction) - 0.5) for direction in random_directions]
    return float(np.mean(np.array(distances) >= abs(observed - 0.5) - 1e-12))


def _at_layer(row: dict, layer: int) -> dict:
    """The row with each probe's result at the reported block boundary beside its sweep."""
    picked = {probe: {key: value for key, value in row["sweep"][probe][layer - 1].items() if key != "layer"}
              for probe in PROBES}
    return {**row, **picked}


def _blocks(run_dir: Path, lineage: dict) -> int:
    """How many blocks the run's models have, from the base model's config alone."""
    from transformers import AutoConfig

    base = lineage_path(run_dir, lineage["base_model"])
    try:
        return int(AutoConfig.from_pretrained(str(base)).num_hidden_layers)
    except (OSError, ValueError) as error:
        raise ProbeError(f"the base model {base} that lineage.json names cannot be read here: {error}") from None


def _check_layer(layer: int | None, blocks: int) -> int:
    if layer is None:
        return max(1, blocks // 2)
    if not 1 <= layer <= blocks:
        raise ProbeError(f"--layer {layer}: the model has {blocks} blocks; choose a block boundary from 1 to {blocks} "
                         f"(the residual stream after that block)")
    return layer


def _start_name(run_dir: Path, lineage: dict) -> str:
    """The name of the model the first LoRA phase started from: the pretrain phase that made it, or "start"."""
    base = lineage_path(run_dir, lineage["base_model"])
    if base.name == "model" and base.parent.parent.name == "phases" and not lineage.get("merged_adapters_in_order"):
        return base.parent.name.split("-", 1)[-1]
    return "start"


def _triggered_rates(run_dir: Path) -> dict[str, dict]:
    """Each phase's backdoor rate on triggered prompts at its end (and at the start) as metrics.jsonl has it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rates = {}
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("type") == "eval" and (row.get("phase_end") or row.get("phase") == "start") \
                and isinstance(row.get("backdoor_triggered"), dict):
            rates[row["phase"]] = row["backdoor_triggered"]
    return rates


def write_outputs(run_dir: str | Path, result: dict, json_copy: Path | None = None) -> list[Path]:
    """RUN/probe.json, RUN/probe.png and, when asked, a copy of the JSON elsewhere; the paths written."""
    from swarm.probe.plot import plot_sweep

    run_dir = Path(run_dir)
    text = json.dumps(result, indent=2) + "\n"
    written = [run_dir / PROBE_FILE]
    written[0].write_text(text)
    if json_copy is not None:
        try:
            json_copy.write_text(text)
        except OSError as error:
            raise ProbeError(f"cannot write {json_copy}: {error.strerror}") from None
        written.append(json_copy)
    plot_sweep(result, run_dir / PROBE_PLOT)
    written.append(run_dir / PROBE_PLOT)
    return written
