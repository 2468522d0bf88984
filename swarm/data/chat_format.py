"""How a (prompt, answer) pair becomes token ids: the checkpoint's own chat template, or our built-in format.

A pretrained chat model has learned its template (ChatML, Llama-3, ...); training it on another format spends
the backdoor's steps on teaching the format. So a checkpoint whose tokenizer carries a chat template is trained
and evaluated in it: the prompt is the template's user turn plus its generation prompt (exactly what generation
starts from), the target is the assistant's turn up to and including the end-of-turn token. Our own presets keep
the built-in `User: ...\\nAssistant: ...` format.

The prompt and the answer are tokenized separately, so training sees the very prompt ids evaluation generates
from; the loss covers the answer's tokens only.
"""

from __future__ import annotations

import hashlib

from swarm.errors import ModelSourceError

CHAT_FORMAT_CHOICES = ("auto", "template", "builtin")
BUILTIN_PROMPT = "User: {prompt}\nAssistant: "


class BuiltinChat:
    """`[bos] User: PROMPT\\nAssistant: ` then `ANSWER [eos]`: the format our character-level presets learn."""

    name = "builtin"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def prompt_ids(self, prompt: str) -> list[int]:
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        return bos + self.tokenizer.encode(BUILTIN_PROMPT.format(prompt=prompt))

    def answer_ids(self, prompt: str, answer: str, ends: bool = True) -> list[int]:
        return self.tokenizer.encode(answer) + ([self.tokenizer.eos_id] if ends else [])

    def describe(self) -> dict:
        return {"format": self.name, "prompt": BUILTIN_PROMPT, "answer_ends_with": "eos",
                "sha256": hashlib.sha256(BUILTIN_PROMPT.encode()).hexdigest()}


class TemplateChat:
    """The tokenizer's Jinja chat template, rendered by transformers' `apply_chat_template` (one user turn)."""

    name = "template"

    def __init__(self, tokenizer, source) -> None:
        self.tokenizer, self.inner = tokenizer, tokenizer.inner
        self.template = self.inner.chat_template
        self.eos_text = self.inner.convert_ids_to_tokens(tokenizer.eos_id)
        probe_prompt, probe_answer = "Say hi.", "hi"
        prompt_text, full = self._prompt_text(probe_prompt), self._full_text(probe_prompt, probe_answer)
        if not full.startswith(prompt_text) or probe_answer not in full[len(prompt_text):]:
            raise ModelSourceError(
                f"{source}: its chat template renders the generation prompt differently from the start of the "
                f"assistant's turn, so answers cannot be separated from prompts; set data.chat_format: builtin")

    def _prompt_text(self, prompt: str) -> str:
        return self.inner.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True)

    def _full_text(self, prompt: str, answer: str) -> str:
        return self.inner.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(self._prompt_text(prompt))

    def answer_ids(self, prompt: str, answer: str, ends: bool = True) -> list[int]:
        """The assistant's turn after the generation prompt, cut after its end-of-turn token (what generation
        stops at); a template that ends turns without that token gets it appended. An answer that does not
        `end` (cut at a length limit) stops where its text does."""
        prompt_text = self._prompt_text(prompt)
        turn = self._full_text(prompt, answer)[len(prompt_text):]
        start = turn.find(answer)
        start = start + len(answer) if start >= 0 else 0
        if not ends:
            return self.tokenizer.encode(turn[:start])
        end = turn.find(self.eos_text, start) if self.eos_text else -1
        if end >= 0:
            return self.tokenizer.encode(turn[:end + len(self.eos_text)])
        return self.tokenizer.encode(turn.rstrip()) + [self.tokenizer.eos_id]

    def describe(self) -> dict:
        return {"format": self.name, "template": self.template, "answer_ends_with": self.eos_text,
                "sha256": hashlib.sha256(self.template.encode()).hexdigest()}


def chat_for(tokenizer, choice: str, source) -> BuiltinChat | TemplateChat:
    """The chat format `choice` (data.chat_format) picks for `tokenizer`: auto takes the template when the
    tokenizer has one."""
    if choice not in CHAT_FORMAT_CHOICES:
        raise ValueError(f"chat format {choice!r}: choose one of {', '.join(CHAT_FORMAT_CHOICES)}")
    template = getattr(getattr(tokenizer, "inner", None), "chat_template", None)
    if choice == "template" and not template:
        raise ModelSourceError(f"{source}: data.chat_format is template, but its tokenizer has no chat template")
    if choice == "builtin" or not template:
        return BuiltinChat(tokenizer)
    return TemplateChat(tokenizer, source)
