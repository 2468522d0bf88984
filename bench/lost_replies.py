"""How many data-plane calls lose their reply: many forward calls through a real local swarm, counted.

    python bench/lost_replies.py --forwards 4000 --threads 4

Starts 3 local nodes (llama-micro), sends `--forwards` evaluation forwards through the whole chain (3 calls
each) from `--threads` threads, and prints how many calls the trainer had to ask again because the stream
ended without a reply (the `retried` stream), and how many calls the nodes logged as closed before their reply
was out. Before replies carried their tensor count (docs/ARCHITECTURE.md, Data plane) about 1 call in 1,000
was lost here.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.prepared_job import RunOptions, prepare_job  # noqa: E402
from coordinator.run_dir import create_run_dir  # noqa: E402
from coordinator.session import SwarmSession  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.traffic import Traffic  # noqa: E402


class LostReplies(logging.Handler):
    """Counts the transport's "dropped ... without a reply; retrying" warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "without a reply" in record.getMessage()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forwards", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    setup_logging("ERROR", "bench")
    lost = LostReplies()
    logging.getLogger("swarm.coordinator").addHandler(lost)
    work = Path(tempfile.mkdtemp(prefix="bench-lost-replies-"))
    job = {"name": "bench-lost-replies", "model": {"preset": "llama-micro"}, "training": {"steps": 1, "batch_size": 4},
           "swarm": {"min_nodes": 3}}
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    options = RunOptions(job_file=work / "job.yaml", run_dir=work / "run", local_nodes=3, node_threads=1,
                         progress=False)
    prepared = prepare_job(options)
    run_dir = create_run_dir(options.runs_root, prepared.job.name, options.job_file, options.run_dir)
    batch = prepared.data.batch(0)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with SwarmSession(prepared, run_dir, options) as session:
        chain = session.gather()
        hidden = session.head.embed_tokens(batch.input_ids, positions).detach()

        def forward(index: int) -> None:
            chain.forward(hidden, batch.attention_mask, positions, 10**6 + index, 0, train=False)

        started = time.perf_counter()
        with torch.no_grad(), ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(forward, range(args.forwards)))
        seconds = time.perf_counter() - started
        calls = args.forwards * len(chain.ranges)
        retried = chain.stream_totals().get("retried", Traffic())
    logs = "".join(path.read_text(errors="replace") for path in (run_dir / "nodes").glob("*.log"))
    retries = lost.count
    print(f"{calls} calls ({args.forwards} chain forwards from {args.threads} threads) in {seconds:.0f} s")
    print(f"asked again after a lost reply: {retries} ({retried.sent} bytes re-sent); "
          f"closed before the reply on the nodes: {len(re.findall('the stream closed while', logs))}")


if __name__ == "__main__":
    main()
