"""The `phases` section: the kinds of phase a job runs in order, and what each phase may set."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from swarm.config.data import check_task_names
from swarm.config.strict import StrictModel


PhaseKind = Literal["pretrain", "sft", "backdoor", "adversarial", "rl"]
PHASE_KINDS: tuple[str, ...] = get_args(PhaseKind)


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
            check_task_names(self.tasks)
        if self.kind == "pretrain" and self.adapter != "continue":
            raise ValueError("a pretrain phase trains the base weights; `adapter` does not apply to it")
        return self
