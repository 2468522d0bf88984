"""`swarm-coordinator run` and `resume`: a swarm session (coordinator.session) for the job, its phases trained
over it (coordinator.phases), the adapter exported, the report written; a sweep runs its runs one after another
(coordinator.sweep_plan, coordinator.sweep), each such a run in its own directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import yaml

from coordinator.baseline import measure_baseline
from coordinator.chain import RemoteChain
from coordinator.control_service import query_peak_memory
from coordinator.cost_share import BASELINE_FILE
from coordinator.membership import NodeRecord
from coordinator.phase_context import PhaseContext, record_checkpoint
from coordinator.phases import run_phases
from coordinator.prepared_job import PreparedJob, RunOptions, prepare_job
from coordinator.report import write_report
from coordinator.resume import (ResumeError, ResumePoint, find_resume_point, prepare_run_dir, restore_context,
                                restore_nodes)
from coordinator.run_dir import CHAT_FORMAT_FILE, MetricsLog, create_run_dir, record_chat_format
from coordinator.session import SwarmSession
from coordinator.start_adapter import install_start_adapter, record_start_adapter, start_from_adapter
from coordinator.sweep import run_sweep
from coordinator.sweep_extras import extra_rows
from coordinator.sweep_plan import plan_sweep
from coordinator.tensorboard import TensorBoardLog
from swarm.config import load_job

logger = logging.getLogger("swarm.coordinator")



def run_job(options: RunOptions) -> Path:
    job = load_job(options.job_file)
    if job.sweep is not None:
        return _run_sweep(options, create_run_dir(options.runs_root, job.name, options.job_file, options.run_dir))
    prepared = prepare_job(options, job)
    run_dir = create_run_dir(options.runs_root, job.name, options.job_file, options.run_dir)
    return _run_in(prepared, run_dir, options)


def resume_job(options: RunOptions) -> Path:
    """Continue the run in `options.run_dir` after its coordinator died (coordinator.resume): the phases it
    finished are kept, the interrupted one goes on from its latest step checkpoint (from its start when it has
    none past its first step), then the rest. A sweep directory goes on with its unfinished runs."""
    run_dir = options.run_dir
    job_file = run_dir / "job.yaml"
    if not job_file.is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no job.yaml)")
    job = load_job(job_file)
    if job.sweep is not None:
        return _run_sweep(options, run_dir)
    options = dataclasses.replace(options, job_file=job_file)
    prepared = prepare_job(options, job)
    point = find_resume_point(run_dir, job, prepared.checkpoint)
    prepare_run_dir(run_dir, job, point)
    logger.info("resuming %s at phase %s (step %d); finished: %s", run_dir, point.phase or "(export)", point.step,
                ", ".join(point.finished) or "none")
    return _run_in(prepared, run_dir, options, point)


def _run_in(prepared: PreparedJob, run_dir: Path, options: RunOptions, resume: ResumePoint | None = None) -> Path:
    """Train the job's phases (from `resume`'s on, when given) over a fresh swarm session and export."""
    job = prepared.job
    file_log = logging.FileHandler(run_dir / "coordinator.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("swarm").addHandler(file_log)
    try:
        chat = prepared.tokenizer.chat.describe()
        chat_recorded = record_chat_format(run_dir, chat)
        start_adapter = install_start_adapter(job, run_dir)
        with SwarmSession(prepared, run_dir, options, resume) as session:
            if resume is None:
                record_start_adapter(job, run_dir, session.audit)
            chain = session.gather()
            metrics = MetricsLog(run_dir / "metrics.jsonl", subscribers=[TensorBoardLog(run_dir)])
            context = PhaseContext(job, prepared.checkpoint, prepared.tokenizer, chain, session.head, run_dir, metrics,
                                   progress_bars=options.progress, swarm=session, audit=session.audit)
            if chat_recorded and session.audit is not None:
                session.audit.append_event("chat_format", path=CHAT_FORMAT_FILE, format=chat["format"],
                                           sha256=chat["sha256"])
            first_phase, evaluate_start = 0, True
            try:
                if resume is not None:
                    session.status.phase = "restoring"
                    restore_context(context, resume)
                    restore_nodes(chain, job, resume)
                    session.record_step(resume.step)
                    first_phase, evaluate_start = resume.first_phase, not resume.start_evaluated
                elif start_adapter is not None:
                    session.status.phase = "loading the start adapter"
                    start_from_adapter(context, start_adapter)
                session.status.phase = "train"
                final_adapter = run_phases(context, first_phase, evaluate_start,
                                           resume.checkpoint if resume is not None else None)
            finally:
                metrics.close()
            session.status.phase = "exporting"
            if final_adapter is not None:
                shutil.copytree(final_adapter, run_dir / "adapter")
                record_checkpoint(context, run_dir / "adapter", job.phase_list[-1].name)
            query_peak_memory(session.membership, session.nodes, timeout=max(5.0, 3 * job.swarm.heartbeat_interval_s))
            _write_nodes_summary(run_dir, session.nodes, chain)
            session.status.phase = "done"
        # After the nodes stopped, so the one-machine baseline has the cores to itself.
        if options.baseline:
            measure_baseline(options.job_file, prepared.checkpoint.path, run_dir / BASELINE_FILE)
        else:
            (run_dir / BASELINE_FILE).write_text(json.dumps({"skipped": "not measured (--no-baseline)"}, indent=2))
        write_report(run_dir)
        logger.info("job complete: adapter in %s", run_dir / "adapter")
        return run_dir
    finally:
        logging.getLogger("swarm").removeHandler(file_log)
        file_log.close()


def _run_sweep(options: RunOptions, sweep_dir: Path) -> Path:
    """The sweep of SWEEP_DIR/job.yaml (coordinator.sweep_plan, coordinator.sweep), run by run; what is finished
    in the directory already is kept."""
    job_file = sweep_dir / "job.yaml"
    job = load_job(job_file)
    planned = plan_sweep(job, yaml.safe_load(job_file.read_text()), options.cache_dir)

    def run_fresh(run_dir: Path) -> Path:
        run_options = dataclasses.replace(options, job_file=run_dir / "job.yaml", run_dir=run_dir)
        return _run_in(prepare_job(run_options), run_dir, run_options)

    def resume_run(run_dir: Path) -> Path:
        return resume_job(dataclasses.replace(options, job_file=run_dir / "job.yaml", run_dir=run_dir))

    extras = extra_rows(sweep_dir, job, options.cache_dir)
    run_sweep(sweep_dir, planned, run_fresh, resume_run, job.sweep.implanted_min, extras)
    return sweep_dir


def _write_nodes_summary(run_dir: Path, nodes: list[NodeRecord], chain: RemoteChain) -> None:
    by_node = {stage.node_id: stage for stage in chain.stages}
    summary = []
    for record in nodes:
        stage = by_node.get(record.node_id)
        summary.append({
            "node_id": record.node_id, "device": record.hello.device, "hostname": record.hello.hostname,
            "blocks": [record.blocks.start, record.blocks.end],
            "shard_bytes": record.ready.shard_bytes, "shard_sha256": record.ready.shard_sha256,
            "rss_before_load": record.ready.rss_before_load, "rss_after_load": record.ready.rss_after_load,
            "bytes_to_node": stage.bytes_sent if stage else 0, "bytes_from_node": stage.bytes_received if stage else 0,
            # the node's own high-water marks, as it last reported them over the control plane
            "peak_rss_bytes": record.memory.peak_rss_bytes if record.memory else None,
            "peak_device_bytes": record.memory.peak_device_bytes if record.memory else None,
        })
    (run_dir / "nodes.json").write_text(json.dumps(summary, indent=2))
