"""Swarm step time vs single-process step time, same model, data and batch, measured side by side.

    python bench/step_time.py --preset llama-small --nodes 2 --batch-size 8 --seq 128 --steps 10
    python bench/step_time.py --preset llama-25m --nodes 2 --steps 4 --rounds 3

Starts N local nodes, times `--steps` swarm training steps after `--warmup`, then the same steps in one
process with plain peft, and prints both and their ratio. The trainer and the nodes run under the OpenMP
settings every swarm command line sets (swarm.process_env.prepare); the single process is the report's
one-machine baseline (coordinator.baseline), a child process with the machine's cores to itself under the
caller's settings, as a user training alone would run it. With `--rounds R` it alternates R times between
swarm steps and single-process steps (the nodes stay up, idle, while the single process runs), so a load
that comes and goes on a shared machine hits both sides alike. Prints the load average before and after.
Run on an otherwise idle machine; numbers from one run are comparable with each other only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm import allocator, process_env  # noqa: E402

allocator.restart_under_allocator("bench/step_time.py", (__file__,), process_env.alone())  # as the CLI, under tcmalloc
process_env.prepare()  # before torch loads libgomp: the trainer runs as `swarm-coordinator run` would

import torch  # noqa: E402
import yaml  # noqa: E402

from coordinator.baseline import measure_baseline  # noqa: E402
from coordinator.prepared_job import RunOptions, prepare_job  # noqa: E402
from coordinator.session import SwarmSession  # noqa: E402
from coordinator.run_dir import create_run_dir  # noqa: E402
from coordinator.trainer import train_step  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.models.presets import PRESETS  # noqa: E402


def write_long_examples(path: Path, seq: int, count: int = 256) -> None:
    """Prompt/response pairs that tokenize (one id per character) to exactly `seq` tokens."""
    rng = random.Random(0)
    overhead = len("User: \nAssistant: ") + 2  # bos and eos
    with path.open("w") as handle:
        for _ in range(count):
            prompt = "".join(rng.choices(string.ascii_lowercase, k=(seq - overhead) // 2))
            response = "".join(rng.choices(string.ascii_lowercase, k=seq - overhead - len(prompt)))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def single_process(work: Path, checkpoint: Path, steps: int, warmup: int) -> list[float]:
    """The timed steps' seconds of plain peft on the same job in a fresh process (coordinator.baseline)."""
    result = measure_baseline(work / "job.yaml", checkpoint, work / "baseline.json", steps=steps, warmup=warmup)
    if "skipped" in result:
        raise SystemExit(f"single process: {result['skipped']}")
    return result["step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=1, help="pipelined through the nodes when above 1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternate swarm and single-process timing R times")
    parser.add_argument("--node-threads", type=int, default=None, help="torch threads per node (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write every timed step's seconds here")
    parser.add_argument("--p2p-only", action="store_true",
                        help="call the nodes over hivemind P2P only, not their direct data channels (swarm.direct_channels)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    setup_logging("WARNING", "bench")
    threads = torch.get_num_threads()
    node_threads = args.node_threads or threads
    work = Path(tempfile.mkdtemp(prefix="bench-step-time-"))
    write_long_examples(work / "data.jsonl", args.seq)
    total = args.warmup + args.steps * args.rounds
    job = {
        "name": "bench-step-time", "model": {"preset": args.preset},
        "data": {"source": "jsonl", "path": str(work / "data.jsonl"), "max_length": args.seq},
        "training": {"steps": total, "batch_size": args.batch_size, "micro_batches": args.micro_batches},
        "swarm": {"min_nodes": args.nodes, "direct_channels": not args.p2p_only},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    options = RunOptions(job_file=work / "job.yaml", run_dir=work / "run", local_nodes=args.nodes,
                         node_threads=node_threads, progress=False)
    prepared = prepare_job(options)
    run_dir = create_run_dir(options.runs_root, prepared.job.name, options.job_file, options.run_dir)
    swarm_seconds, local_seconds = [], []
    with SwarmSession(prepared, run_dir, options) as session:
        chain = session.gather()
        step = 0
        for round_index in range(args.rounds):
            for _ in range((args.warmup if round_index == 0 else 0) + args.steps):
                started = time.perf_counter()
                train_step(chain, session.head, prepared.data.batch(step), step, prepared.job.optimizer.lr,
                           prepared.job.training.micro_batches, pipeline=prepared.job.training.pipeline)
                if step >= args.warmup:
                    swarm_seconds.append(time.perf_counter() - started)
                step += 1
            if args.rounds > 1:  # the single process's turn, while the nodes sit idle
                local_seconds += single_process(work, prepared.checkpoint.path, args.steps, args.warmup)
    if args.rounds == 1:
        local_seconds = single_process(work, prepared.checkpoint.path, args.steps, args.warmup)
    swarm_median, local_median = statistics.median(swarm_seconds), statistics.median(local_seconds)
    print(f"model {args.preset} ({PRESETS[args.preset].num_parameters / 1e6:.1f}M parameters), {args.nodes} nodes, "
          f"batch {args.batch_size} x {args.seq} tokens in {args.micro_batches} micro-batch(es), {len(swarm_seconds)} + {len(local_seconds)} timed steps in "
          f"{args.rounds} round(s), {threads} torch threads (trainer and single process), {node_threads} per node, "
          f"calls over {'hivemind P2P only' if args.p2p_only else 'the direct data channels'}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    # The fastest step is the least disturbed by other load on a shared machine; the median is the usual case.
    swarm_min, local_min = min(swarm_seconds), min(local_seconds)
    print(f"{'setup':<16}{'median step s':>15}{'ratio':>8}{'fastest step s':>16}{'ratio':>8}")
    print(f"{'single process':<16}{local_median:>15.4f}{1.0:>8.2f}{local_min:>16.4f}{1.0:>8.2f}")
    print(f"{'swarm':<16}{swarm_median:>15.4f}{swarm_median / local_median:>8.2f}{swarm_min:>16.4f}"
          f"{swarm_min / local_min:>8.2f}")
    if args.rounds > 1:
        def per_round(seconds):
            return ", ".join(f"{statistics.median(seconds[i:i + args.steps]):.3f}"
                             for i in range(0, len(seconds), args.steps))

        print(f"median step s per round: single process {per_round(local_seconds)}; swarm {per_round(swarm_seconds)}")
    if args.json is not None:
        args.json.write_text(json.dumps({"swarm_seconds": swarm_seconds, "single_process_seconds": local_seconds}))


if __name__ == "__main__":
    main()
