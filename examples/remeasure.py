"""Re-measure a finished run's phase outside the swarm, with plain transformers + peft + the tokenizer's own chat
template, and compare with the rates the swarm reported for it.

    python examples/remeasure.py RUN_DIR [--phase NAME] [--batch-size 16]

The phase's model is rebuilt from its `lineage.json` alone (base model, adapters merged in order, the phase's
adapter); prompts are the run's evaluation prompts, rendered with `tokenizer.apply_chat_template` (the run's
`chat_format.json` says which template the swarm used; a character-level preset's tokenizer renders our
built-in format); answers are greedy with transformers' own `generate` (KV cache, no swarm code); scoring is
`swarm.evaluation.score`, the swarm's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.run_dir import read_metrics  # noqa: E402
from swarm.config import load_job  # noqa: E402
from swarm.evaluation import CONDITIONS, score  # noqa: E402
from swarm.finished_run import CHAT_FORMAT_FILE, lora_phases, phase_model, run_eval_sets, run_tokenizer  # noqa: E402
from swarm.models.checkpoint import resolve_model  # noqa: E402


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = []
    for start in range(0, len(prompts), batch_size):
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts[start:start + batch_size]]
        encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--phase", help="phase name (default: every LoRA phase)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    job = load_job(run_dir / "job.yaml")
    if job.eval is None:
        parser.error(f"{run_dir}: the job has no eval section, so the swarm measured nothing to compare with")
    from transformers import AutoTokenizer

    ours = run_tokenizer(run_dir, job)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(job.model)))
    recorded = json.loads((run_dir / CHAT_FORMAT_FILE).read_text())
    if recorded["format"] == "template":
        assert hashlib.sha256(hf_tokenizer.chat_template.encode()).hexdigest() == recorded["sha256"]
    sets = run_eval_sets(run_dir, job, ours)  # the swarm's prompts
    swarm_rows = {row["phase"]: row for row in read_metrics(run_dir / "metrics.jsonl")
                  if row["type"] == "eval" and row.get("phase_end")}
    phases = lora_phases(run_dir)
    if args.phase:
        phases = [phase for phase in phases if phase.name == args.phase]
        if not phases:
            parser.error(f"{run_dir}: no LoRA phase named {args.phase}")
    print(f"{'phase':<16} {'rate':<28} {'plain peft':>10} {'swarm':>8}")
    for phase in phases:
        name = phase.name
        started = time.monotonic()
        model = phase_model(run_dir, phase)
        generations = {c: generate(model, hf_tokenizer, sets.prompts[c], job.eval.max_new_tokens, args.batch_size)
                       for c in CONDITIONS}
        rates = score(generations, sets, job.backdoor)
        swarm = swarm_rows.get(name, {})
        saved = run_dir / "evaluations" / f"step-{swarm.get('step', -1):06d}-{name}.jsonl"
        if saved.is_file():  # the swarm's own answers, one by one
            theirs = [json.loads(line) for line in saved.read_text().splitlines()]
            ours_answers = [answer for condition in CONDITIONS for answer in generations[condition]]
            same = sum(a["answer"].strip() == b.strip() for a, b in zip(theirs, ours_answers))
            print(f"{name:<16} {'answers identical':<28} {same:>6}/{len(theirs)}")
        for rate_name, rate in rates.items():
            if any(rate_name.endswith(f"_{task}") for task in set(sets.tasks)):
                continue  # per-task rows: in metrics.jsonl
            theirs = swarm.get(rate_name, {}).get("rate")
            shown = "-" if theirs is None else f"{theirs:.2f}"
            print(f"{name:<16} {rate_name:<28} {rate.value:>10.2f} {shown:>8}")
        print(f"{name:<16} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
