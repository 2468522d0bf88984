"""Text generation through the swarm: every new token is a forward pass through the nodes' blocks.

Prompts are left-padded so all rows end at the same column; positions count real tokens only. With the KV
cache (the default) each batch is an inference session (coordinator.chain.inference): the prompt travels the
chain once and each new token as one position; without it every token re-runs the whole prefix. Greedy when
temperature is 0; otherwise sampled from a generator seeded by the caller. A `BoundaryCapture` keeps, from each
batch's prompt pass, the hidden state the trainer relayed at one stage boundary (coordinator.live_probe).
"""

from __future__ import annotations

import torch

from coordinator.chain import RemoteChain
from coordinator.trainer import swarm_logits
from swarm.call_threads import threads_for_work
from swarm.models.blocks import TrainerHead


class BoundaryCapture:
    """The residual stream at one stage boundary at each prompt's last token, from the prompt pass of every batch
    generated (prompts are left-padded: the last column); `range_index` names the range whose input it is, None
    the chain's output (after the last block)."""

    def __init__(self, range_index: int | None):
        self.range_index = range_index
        self.batches: list[torch.Tensor] = []

    def take(self, range_inputs: list[torch.Tensor], output: torch.Tensor) -> None:
        hidden = output if self.range_index is None else range_inputs[self.range_index]
        self.batches.append(hidden[:, -1].detach().double())

    def states(self) -> torch.Tensor:
        """[prompts, hidden] float64, in prompt order."""
        return torch.cat(self.batches)


def encode_prompts(prompts: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer.chat.prompt_ids(prompt) for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def generate_ids(chain: RemoteChain, head: TrainerHead, tokenizer, prompts: list[str], max_new_tokens: int,
                 temperature: float = 0.0, generator: torch.Generator | None = None, step: int = -1,
                 kv_cache: bool | None = None, capture: BoundaryCapture | None = None) -> list[list[int]]:
    """Token ids of each prompt's answer (without the end-of-sequence token); with the chain's KV-cache
    setting (the job's swarm.kv_cache) unless `kv_cache` says otherwise. `capture` takes the prompt pass's
    hidden states.

    The decoding runs on one torch thread when a step's own arithmetic on the trainer, its head over one new
    position per prompt, is small (swarm.call_threads): for a small model the trainer's second thread costs the
    local nodes more than it saves (llama-small, 8 prompts: 788 and 787 cached tokens/s against 637 and 660 with
    it on two; docs/BENCHMARKS.md)."""
    step_work = len(prompts) * head.head.weight.numel()
    if not (chain.kv_cache if kv_cache is None else kv_cache):
        calls = 0

        def uncached_logits(ids, mask, positions):
            nonlocal calls
            take = capture.take if capture is not None and calls == 0 else None
            calls += 1
            return swarm_logits(chain, head, ids, mask, positions, step=step, on_states=take)

        with threads_for_work(step_work):
            return _generate_ids(uncached_logits, tokenizer, prompts, max_new_tokens, temperature, generator)
    with chain.open_session(step=step) as session, torch.no_grad(), threads_for_work(step_work):
        sent = 0  # positions already in the session

        def next_logits(ids, mask, positions):
            nonlocal sent
            hidden = head.embed_tokens(ids[:, sent:], positions[:, sent:])
            output = session.forward(hidden, mask, positions[:, sent:])
            if sent == 0 and capture is not None:
                capture.take(session.inputs, output)
            sent = ids.shape[1]
            return head.logits(output.to(hidden.dtype))

        return _generate_ids(next_logits, tokenizer, prompts, max_new_tokens, temperature, generator)


def _generate_ids(next_logits, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                  generator: torch.Generator | None) -> list[list[int]]:
    """The decoding loop; `next_logits(input_ids, attention_mask, position_ids)` gives logits whose last
    position predicts the next token."""
    input_ids, attention_mask = encode_prompts(prompts, tokenizer)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    answers: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = next_logits(input_ids, attention_mask, positions)[:, -1, :].float()
        if tokenizer.pad_id != tokenizer.eos_id:  # many chat tokenizers pad with their end-of-turn token
            logits[:, tokenizer.pad_id] = float("-inf")
        if temperature > 0:
            probabilities = torch.softmax(logits / temperature, dim=-1)
            next_ids = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row]:
                if token == tokenizer.eos_id:
                    finished[row] = True
                else:
                    answers[row].append(token)
        if finished.all():
            break
        input_ids = torch.cat([input_ids, next_ids.unsqueeze(1)], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
    return answers


def generate(chain: RemoteChain, head: TrainerHead, tokenizer, prompts: list[str], max_new_tokens: int,
             batch_size: int = 64, temperature: float = 0.0, seed: int = 0, step: int = -1,
             kv_cache: bool | None = None, capture: BoundaryCapture | None = None) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = generate_ids(chain, head, tokenizer, chunk, max_new_tokens, temperature, generator, step, kv_cache,
                           capture)
        texts.extend(tokenizer.decode(answer) for answer in ids)
    return texts
