"""Node peak memory vs its shard's share of the model, next to a process that trains the whole model.

    python bench/node_memory.py --preset llama-25m --nodes 1 2 4 --steps 3

For each node count, starts a swarm of that many local node processes (each gets an even block range), trains
`--steps` steps of batch 8 x 128 tokens, and asks every node for its peak RSS over the control plane (the
same query a run makes for its report). Then the single-process baseline (`coordinator.baseline`, plain peft
on the whole model) trains the same steps in its own process. Printed per setup: the share of the model's
parameters held, the peak RSS, its growth over the process's RSS before loading weights (imports excluded),
and that growth relative to the whole-model process's, divided by the share (1.00 = memory exactly
proportional to the shard).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.baseline import measure_baseline  # noqa: E402
from coordinator.control_service import query_peak_memory  # noqa: E402
from coordinator.prepared_job import RunOptions, prepare_job  # noqa: E402
from coordinator.session import SwarmSession  # noqa: E402
from coordinator.run_dir import create_run_dir  # noqa: E402
from coordinator.trainer import train_step  # noqa: E402
from step_time import write_long_examples  # noqa: E402
from swarm.estimate import ModelShape  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.models.presets import PRESETS  # noqa: E402

MIB = 1 << 20


def swarm_peaks(job_file: Path, work: Path, nodes: int, steps: int) -> list[dict]:
    """Peak memory each node of an `nodes`-node swarm reports after `steps` training steps."""
    options = RunOptions(job_file=job_file, run_dir=work / f"run-{nodes}", local_nodes=nodes,
                         node_threads=max(1, torch.get_num_threads() // nodes), fork_nodes=False, progress=False)
    prepared = prepare_job(options)
    run_dir = create_run_dir(options.runs_root, prepared.job.name, options.job_file, options.run_dir)
    with SwarmSession(prepared, run_dir, options) as session:
        chain = session.gather()
        for step in range(steps):
            train_step(chain, session.head, prepared.data.batch(step), step, prepared.job.optimizer.lr,
                       prepared.job.training.micro_batches)
        missing = query_peak_memory(session.membership, session.nodes, timeout=10.0)
        if missing:
            raise SystemExit(f"nodes {missing} did not report their memory")
        return [{"blocks": (r.blocks.start, r.blocks.end), "before": r.ready.rss_before_load,
                 "peak": r.memory.peak_rss_bytes} for r in session.nodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-25m")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    setup_logging("WARNING", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-node-memory-"))
    write_long_examples(work / "data.jsonl", args.seq)
    job = {
        "name": "bench-node-memory", "model": {"preset": args.preset},
        "data": {"source": "jsonl", "path": str(work / "data.jsonl"), "max_length": args.seq},
        "training": {"steps": args.steps, "batch_size": args.batch_size}, "swarm": {"min_nodes": max(args.nodes)},
    }
    shape = ModelShape.from_preset(PRESETS[args.preset])
    rows = []
    for nodes in args.nodes:
        job["swarm"]["min_nodes"] = nodes
        job_file = work / f"job-{nodes}.yaml"
        job_file.write_text(yaml.safe_dump(job))
        for node in swarm_peaks(job_file, work, nodes, args.steps):
            start, end = node["blocks"]
            rows.append((f"{nodes}-node swarm", f"[{start},{end})", (end - start) * shape.block_params, node))
    prepared = prepare_job(RunOptions(job_file=work / f"job-{args.nodes[0]}.yaml"))
    baseline = measure_baseline(work / f"job-{args.nodes[0]}.yaml", prepared.checkpoint.path, work / "baseline.json",
                                steps=args.steps, warmup=0)
    if baseline.get("skipped"):
        raise SystemExit(baseline["skipped"])
    full = {"before": baseline["rss_before_load"], "peak": baseline["peak_rss_bytes"]}
    full_growth = full["peak"] - full["before"]
    print(f"model {args.preset} ({shape.num_parameters / 1e6:.1f}M parameters, fp32), batch {args.batch_size} x "
          f"{args.seq} tokens, {args.steps} training steps, peak RSS (getrusage ru_maxrss)")
    header = (f"{'process':<18}{'blocks':>8}{'share':>8}{'peak MiB':>10}{'before load':>13}{'growth MiB':>12}"
              f"{'growth/full':>13}{'(growth/full)/share':>21}")
    print(header)
    print(f"{'one process, peft':<18}{'all':>8}{1.0:>8.3f}{full['peak'] / MIB:>10.0f}{full['before'] / MIB:>13.0f}"
          f"{full_growth / MIB:>12.0f}{1.0:>13.2f}{1.0:>21.2f}")
    ratios = []
    for setup, blocks, params, node in rows:
        share, growth = params / shape.num_parameters, node["peak"] - node["before"]
        ratios.append(growth / full_growth / share)
        print(f"{setup:<18}{blocks:>8}{share:>8.3f}{node['peak'] / MIB:>10.0f}{node['before'] / MIB:>13.0f}"
              f"{growth / MIB:>12.0f}{growth / full_growth:>13.2f}{ratios[-1]:>21.2f}")
    print(json.dumps({"median (growth/full)/share over nodes": round(statistics.median(ratios), 3)}))


if __name__ == "__main__":
    main()
