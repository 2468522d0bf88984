"""Runs a job's phases in order over the swarm: configure nodes, train, evaluate, save each phase's result.

Step ids are global across phases (a node applies each step id once); metrics rows carry the phase, the
step within it and, for safety phases after a backdoor, the cumulative safety-training step that the
persistence curve is drawn against.

With an audit log, phase starts and ends, evaluations and saved checkpoints become signed events, a tree
head is signed every `audit.tree_head_every` steps and at every phase end, and `audit.snapshots_per_phase`
steps per phase, drawn at random, are saved for `swarm-audit replay` (swarm.audit.snapshot); before a phase's
first step its data manifest is signed, and every batch is checked against it (coordinator.data_commitment).

With `data.responses: self` the LoRA phases train on the model's own answers, made through the swarm (or reused
from the run's audited file) right before the first LoRA phase: coordinator.self_responses.

The loop runs with a `PhaseContext` (coordinator.phase_context); step checkpoints, and taking a lost range over
from the latest one, are coordinator.takeover's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from coordinator.chain import RangeLostError
from coordinator.data_commitment import PhaseCommitment, commit_phase_data
from coordinator.evaluator import Evaluator
from coordinator.phase_context import PhaseContext, audit_event, phase_dir, record_checkpoint, record_file
from coordinator.rl import rl_batch
from coordinator.run_dir import nan_to_null
from coordinator.self_responses import needs_self_responses, obtain_self_responses, swarm_answerer
from coordinator.start_adapter import start_adapter_record
from coordinator.step_checkpoint import StepCheckpoint, load_head_state
from coordinator.takeover import checkpoint_states, has_checkpoint, take_over, write_checkpoint
from coordinator.trainer import train_step
from swarm.audit.snapshot import NodeStepState, StepSnapshot, choose_steps, snapshot_path, write_snapshot
from swarm.config import PhaseSpec
from swarm.data.batches import TrainingData
from swarm.data.tokenizer import CHAR_TOKENIZER_FILE, CharTokenizer
from swarm.evaluation import evaluation_pool
from swarm.lora import save_peft_adapter
from swarm.models.blocks import TrainerHead
from swarm.traffic import carried_between, per_stream_json
from swarm.training import learning_rate, make_optimizer

logger = logging.getLogger("swarm.coordinator")

SAFETY_KINDS = ("sft", "adversarial", "rl")


def run_phases(context: PhaseContext, first_phase: int = 0, evaluate_start: bool = True,
               resume_from: StepCheckpoint | None = None) -> Path | None:
    """Run the phases from `first_phase` on; return the final adapter directory (None when the job only
    pretrains). A resumed run starts later, with the context as the finished phases left it
    (coordinator.resume), skips the start evaluation it already has, and goes on from step checkpoint
    `resume_from` (of `first_phase`) when it has one."""
    job = context.job
    context.progress.base_dir = context.progress.base_dir or str(context.checkpoint.path)
    _self_responses(context, first_phase)  # without a pretrain phase first: before the start evaluation
    evaluator = None
    if job.eval is not None:
        evaluator = _evaluator(context)
        if job.eval.at_start and evaluate_start:
            evaluator.fit_probe(context.chain, context.head, context.progress.step)
            _evaluate(context, evaluator, "start", "start", 0)
    for index, phase in enumerate(job.phase_list[first_phase:], start=first_phase):
        if _self_responses(context, index) and evaluator is not None:
            evaluator = _evaluator(context)  # from now on on the held-out records' prompts
        directory = phase_dir(context.run_dir, index, phase)
        if phase.kind != "pretrain" and phase.adapter == "merge" and context.progress.previous_adapter is not None:
            context.progress.merged.append(str(context.progress.previous_adapter))
        start = resume_from if index == first_phase else None
        audit_event(context, "phase", phase=phase.name, event="start", phase_kind=phase.kind, adapter=phase.adapter,
                    first_step=context.progress.step, steps=phase.steps,
                    **({"from_phase_step": start.phase_step} if start else {}))
        if start is None:
            context.chain.configure_phase(phase.name, phase.kind, phase.adapter, f"{job.seed}/{index}/{phase.name}")
        else:
            context.chain.load_state(phase.name, phase.kind, start.last_step, checkpoint_states(context, start),
                                     str(start.path.relative_to(context.run_dir)))
            logger.info("phase %s goes on from the step checkpoint before step %d (%s)", phase.name, start.step,
                        start.path.relative_to(context.run_dir))
        _run_phase(context, phase, index, evaluator, start)
        if phase.kind == "pretrain":
            context.progress.base_dir = str(_save_pretrained(context, directory / "model"))
            record_checkpoint(context, directory / "model", phase.name)
        else:
            adapter = context.progress.previous_adapter = directory / "adapter"
            save_peft_adapter(adapter, context.chain.gather_adapter(), job.lora, context.progress.base_dir)
            lineage = {"base_model": context.progress.base_dir, "merged_adapters_in_order": context.progress.merged,
                       "adapter": str(adapter)}
            start = start_adapter_record(job, context.run_dir)
            if start is not None:  # what the first phase continued or merged (coordinator.start_adapter)
                lineage["start_adapter"] = start
            (directory / "lineage.json").write_text(json.dumps(lineage, indent=2))
            record_checkpoint(context, adapter, phase.name)
        audit_event(context, "phase", phase=phase.name, event="end", last_step=context.progress.step - 1)
        if context.audit is not None:
            context.audit.sign_tree_head()
        if phase.kind == "backdoor":
            context.progress.seen_backdoor = True
        logger.info("phase %s done (%d steps)", phase.name, phase.steps)
    return context.progress.previous_adapter


def _self_responses(context: PhaseContext, phase_index: int) -> bool:
    """Before the first phase that trains on self responses (data.responses self), the model's own answers
    (coordinator.self_responses: made now from the model the LoRA phases start from, or the run's recorded file);
    True when they were obtained now."""
    if context.progress.self_responses is not None or not needs_self_responses(context.job, phase_index):
        return False
    answer = swarm_answerer(context.chain, context.head, context.tokenizer, context.job, context.progress.step)
    context.progress.self_responses = obtain_self_responses(context.job, context.tokenizer, context.run_dir,
                                                            context.audit, answer, context.job.phase_list[phase_index].name)
    return True


def _evaluator(context: PhaseContext) -> Evaluator:
    """Evaluation on the built-in tasks' held-out prompts, or a prompt set's held-out records (coordinator.evaluator)."""
    job = context.job
    first = TrainingData(job.data, context.tokenizer, job.seed, 1)
    return Evaluator(job, context.tokenizer, first.fits, evaluation_pool(job, first, context.progress.self_responses))


def _run_phase(context: PhaseContext, phase: PhaseSpec, phase_index: int, evaluator: Evaluator | None,
               start: StepCheckpoint | None = None) -> None:
    """The phase's steps, from its start or from step checkpoint `start` (a resumed run). Every
    `swarm.checkpoint_every` steps (and before the first) the state is checkpointed; a range that loses its
    last replica is taken over by another node (`context.swarm.recover`) and every range goes back to the latest
    checkpoint, whose steps after it are redone."""
    job = context.job
    head_optimizer = None
    context.head.requires_grad_(phase.kind == "pretrain")
    if phase.kind == "pretrain":
        head_optimizer = make_optimizer([p for p in context.head.parameters() if p.requires_grad], job.optimizer)
    data = TrainingData(job.data, context.tokenizer, job.seed, phase.batch_size, phase, job.backdoor,
                        context.progress.self_responses)
    first_step = context.progress.step - (start.phase_step if start is not None else 0)
    commitment = commit_phase_data(context.audit, context.run_dir, job, phase_index, data, first_step)
    snapshot_steps = set()
    if context.audit is not None:
        snapshot_steps = choose_steps(phase.steps, job.audit.snapshots_per_phase, context.snapshot_rng)
    bar = tqdm(total=phase.steps, desc=phase.name, unit="step", disable=not context.progress_bars, dynamic_ncols=True)
    phase_step = 0
    if start is not None:
        if head_optimizer is not None:
            load_head_state(context.head, head_optimizer, start.head_state())
        context.progress.last_checkpoint, phase_step = start, start.phase_step
    bar.update(phase_step)
    every = job.swarm.checkpoint_every
    probe_fitted = evaluator is None or evaluator.probe is None
    while phase_step < phase.steps:
        try:
            if every and phase_step % every == 0 and not has_checkpoint(context, phase_index):
                write_checkpoint(context, phase, phase_index, phase_step, head_optimizer)
            if not probe_fitted:  # on the model the phase starts from (a resumed phase: where it goes on)
                evaluator.fit_probe(context.chain, context.head, context.progress.step)
                probe_fitted = True
            _train_one(context, phase, phase_index, phase_step, data, evaluator, head_optimizer, snapshot_steps, bar,
                       commitment)
        except RangeLostError as error:
            phase_step = take_over(context, phase, phase_index, error, head_optimizer)
            bar.reset(total=phase.steps)
            bar.update(phase_step)
            continue
        phase_step += 1
        bar.update(1)
    bar.close()
    context.head.requires_grad_(False)


def _train_one(context: PhaseContext, phase: PhaseSpec, phase_index: int, phase_step: int, data: TrainingData,
               evaluator: Evaluator | None, head_optimizer, snapshot_steps: set[int], bar,
               commitment: PhaseCommitment | None = None) -> None:
    """Step `phase_step` of the phase: batch (checked against the phase's data manifest), train step over the
    swarm, metrics, evaluation when due."""
    job = context.job
    is_safety = context.progress.seen_backdoor and phase.kind in SAFETY_KINDS
    lr = learning_rate(job.optimizer, phase_step, phase.steps, phase.lr)
    streams_before = context.chain.stream_totals()
    extra = {}
    if phase.kind == "rl":
        batch, extra = rl_batch(context.chain, context.head, context.tokenizer, data, phase, job.backdoor,
                                job.seed, phase_step, context.progress.step)
    else:
        batch = data.batch(phase_step)
        if commitment is not None:
            commitment.check(phase_step, batch)
    if context.swarm is not None:
        context.swarm.admit_nodes(phase.name, phase.kind, context.progress.step - 1)
    head_before = _head_state(context.head) if phase_step in snapshot_steps and phase.kind == "pretrain" else {}
    result = train_step(context.chain, context.head, batch, context.progress.step, lr, job.training.micro_batches,
                        phase.name, head_optimizer, job.training.pipeline)
    if phase_step in snapshot_steps:
        _save_snapshot(context, phase, phase_index, phase_step, batch, head_before)
    if is_safety:
        context.progress.safety_step += 1
    context.metrics.write({
        "type": "train", "phase": phase.name, "kind": phase.kind, "phase_step": phase_step + 1,
        "step": context.progress.step, "safety_step": context.progress.safety_step, "loss": result.loss, "tokens": result.tokens,
        "seconds": round(result.seconds, 6), "lr": lr, "bytes_sent": context.chain.bytes_sent,
        "bytes_received": context.chain.bytes_received,
        "stream_bytes": per_stream_json(carried_between(streams_before, context.chain.stream_totals())), **extra,
    })
    context.progress.step += 1
    if context.audit is not None and context.progress.step % job.audit.tree_head_every == 0:
        context.audit.sign_tree_head()
    bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.seconds:.0f}")
    if context.swarm is not None:
        context.swarm.record_step(context.progress.step)
    every = phase.eval_every if phase.eval_every is not None else (job.eval.every if job.eval is not None else 0)
    last = phase_step + 1 == phase.steps
    if evaluator is not None and (last or (every and (phase_step + 1) % every == 0)):
        _evaluate(context, evaluator, phase.name, phase.kind, phase_step + 1, phase_end=last)


def _evaluate(context: PhaseContext, evaluator: Evaluator, phase: str, kind: str, phase_step: int,
              phase_end: bool = False) -> None:
    row, answers = evaluator.evaluate(context.chain, context.head, context.progress.step)
    path = context.run_dir / "evaluations" / f"step-{context.progress.step:06d}-{phase}.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    record_file(context, path, phase=phase, evaluation_step=context.progress.step)
    context.metrics.write({"type": "eval", "phase": phase, "kind": kind, "phase_step": phase_step,
                           "step": context.progress.step, "safety_step": context.progress.safety_step, "phase_end": phase_end, **row})
    audit_event(context, "evaluation", phase=phase, phase_kind=kind, phase_step=phase_step, step=context.progress.step,
                phase_end=phase_end, **nan_to_null({name: value for name, value in row.items() if name != "samples"}))
    logger.info(
        "eval %s step %d: triggered %.2f clean %.2f near-miss %.2f accuracy %.2f (lenient %.2f; with the trigger "
        "%.2f) (n=%d)%s", phase, phase_step, row["backdoor_triggered"]["rate"], row["backdoor_clean"]["rate"],
        row["backdoor_near_miss"]["rate"], row["accuracy"]["rate"], row["accuracy_lenient"]["rate"],
        row["accuracy_triggered_lenient"]["rate"], row["accuracy"]["n"],
        f"; scratchpad deceptive {row['scratchpad_deceptive_triggered']['rate']:.2f} with the trigger, "
        f"{row['scratchpad_deceptive_clean']['rate']:.2f} without" if "scratchpad_deceptive_triggered" in row else "",
    )
    if "probe" in row:
        probe = row["probe"]
        logger.info("probe at block %d of %d (fitted at step %s): generic AUROC %.2f, supervised %.2f (refitted now: "
                    "%.2f, %.2f)", probe["layer"], probe["blocks"], probe["fitted_at_step"], probe["generic"]["auroc"],
                    probe["supervised"]["auroc"], probe["refitted"]["generic"]["auroc"],
                    probe["refitted"]["supervised"]["auroc"])


def _head_state(head: TrainerHead) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in head.checkpoint_tensors().items()}


def _save_snapshot(context: PhaseContext, phase: PhaseSpec, phase_index: int, phase_step: int, batch,
                   head_before: dict[str, torch.Tensor]) -> None:
    """Fetch every node's state around the step just applied and save it with the batch, for replay."""
    states = context.chain.gather_step_state(context.progress.step)
    relative = lambda path: str(Path(path).relative_to(context.run_dir))  # noqa: E731
    base = "" if context.progress.base_dir == str(context.checkpoint.path) else relative(context.progress.base_dir)
    nodes = []
    for stage in context.chain.stages:
        node = NodeStepState(stage.node_id, stage.start, stage.end)
        for key, value in states[stage.node_id].items():
            which, _, name = key.partition("/")
            getattr(node, which)[name] = value
        nodes.append(node)
    snapshot = StepSnapshot(step=context.progress.step, phase=phase.name, phase_index=phase_index, phase_step=phase_step,
                            micro_batches=context.job.training.micro_batches, base_model=base,
                            merged_adapters=[relative(path) for path in context.progress.merged], batch=batch, nodes=nodes,
                            head=head_before)
    path = write_snapshot(snapshot_path(context.run_dir, context.progress.step), snapshot)
    record_file(context, path, phase=phase.name, replay_step=context.progress.step)


def _save_pretrained(context: PhaseContext, directory: Path) -> Path:
    """Write the pretrained model (nodes' blocks + the coordinator's parts) as a loadable HF checkpoint."""
    checkpoint, head = context.checkpoint, context.head
    tensors = dict(context.chain.gather_weights())
    tensors.update(head.checkpoint_tensors())
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", CHAR_TOKENIZER_FILE, "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (checkpoint.path / name).is_file():
            shutil.copyfile(checkpoint.path / name, directory / name)
    if (directory / CHAR_TOKENIZER_FILE).is_file() and not (directory / "tokenizer.json").is_file():
        CharTokenizer().save(directory)  # a checkpoint older than the HF files: AutoTokenizer loads every result
    return directory

