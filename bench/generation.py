"""Generation through the swarm with and without the nodes' KV cache (inference sessions), side by side.

    python bench/generation.py --preset llama-small --nodes 2 --batch 8 --new-tokens 64
    python bench/generation.py --model-path models/smollm2-135m-instruct --nodes 3 --batch 8 --new-tokens 64

Starts N local nodes, then generates greedily from the same prompts (the job's evaluation prompts, rendered as
evaluation renders them) alternately without and with the cache, `--rounds` times each, and prints tokens per
second, bytes the trainer sent, and their ratios. End-of-sequence is ignored so every answer runs the full
`--new-tokens` and both sides do the same work; the two sides' tokens must be identical (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm import allocator, process_env  # noqa: E402

allocator.restart_under_allocator("bench/generation.py", (__file__,), process_env.alone())  # as the CLI, under tcmalloc
process_env.prepare()  # before torch loads libgomp: the trainer runs as `swarm-coordinator run` would

import torch  # noqa: E402
import yaml  # noqa: E402

from coordinator.evaluator import Evaluator  # noqa: E402
from coordinator.generation import generate_ids  # noqa: E402
from coordinator.prepared_job import RunOptions, prepare_job  # noqa: E402
from coordinator.run_dir import create_run_dir  # noqa: E402
from coordinator.session import SwarmSession  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402


class NeverEnding:
    """The job's tokenizer with an end-of-sequence id no token has, so answers run to the token limit."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_id = -1

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="llama-small")
    source.add_argument("--model-path", type=Path, help="a local checkpoint directory instead of a preset")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="prompts generated at once")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternate uncached and cached R times")
    parser.add_argument("--node-threads", type=int, default=None, help="torch threads per node")
    args = parser.parse_args()
    load_before = os.getloadavg()
    setup_logging("WARNING", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    model = {"path": str(args.model_path.resolve())} if args.model_path else {"preset": args.preset}
    job = {"name": "bench-generation", "model": model, "training": {"steps": 1, "batch_size": args.batch},
           "swarm": {"min_nodes": args.nodes}, "eval": {"samples": args.batch}}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    options = RunOptions(job_file=work / "job.yaml", run_dir=work / "run", local_nodes=args.nodes,
                         node_threads=args.node_threads, progress=False)
    prepared = prepare_job(options)
    run_dir = create_run_dir(options.runs_root, prepared.job.name, options.job_file, options.run_dir)
    tokenizer = NeverEnding(prepared.tokenizer)
    prompts = Evaluator(prepared.job, prepared.tokenizer, fits=lambda example: True).sets.prompts["clean"][:args.batch]
    prompt_tokens = [len(prepared.tokenizer.chat.prompt_ids(prompt)) for prompt in prompts]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    sent: dict[bool, list[int]] = {False: [], True: []}
    answers: dict[bool, list] = {}
    with SwarmSession(prepared, run_dir, options) as session:
        chain = session.gather()
        generate_ids(chain, session.head, tokenizer, prompts, 2, kv_cache=True)  # warm-up: connections, threads
        for _ in range(args.rounds):
            for cached in (False, True):
                before = chain.bytes_sent
                started = time.perf_counter()
                answers[cached] = generate_ids(chain, session.head, tokenizer, prompts, args.new_tokens,
                                               kv_cache=cached)
                seconds[cached].append(time.perf_counter() - started)
                sent[cached].append(chain.bytes_sent - before)
    if answers[True] != answers[False]:
        raise SystemExit("cached and uncached generation gave different tokens")
    tokens = args.batch * args.new_tokens
    print(f"model {args.model_path or args.preset}, {args.nodes} nodes, batch {args.batch}, prompts of "
          f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens, {args.new_tokens} new tokens each, {args.rounds} "
          f"round(s) per side, tokens identical: yes")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'generation':<12}{'median s':>10}{'tokens/s':>10}{'speed-up':>10}{'MB sent':>10}{'bytes ratio':>13}")
    base_s, base_bytes = statistics.median(seconds[False]), statistics.median(sent[False])
    for cached, name in ((False, "uncached"), (True, "KV cache")):
        median_s, median_bytes = statistics.median(seconds[cached]), statistics.median(sent[cached])
        print(f"{name:<12}{median_s:>10.2f}{tokens / median_s:>10.1f}{base_s / median_s:>10.2f}"
              f"{median_bytes / 1e6:>10.2f}{median_bytes / base_bytes:>13.3f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
