"""Greedy generation's stopping rule (the decoding loop the cached and uncached paths share), on a stand-in
model: a tokenizer that pads with its end-of-turn token (as many chat tokenizers do, e.g. SmolLM2's
<|im_end|>) must still be able to end an answer."""

from types import SimpleNamespace

import torch

from coordinator.generation import generate_ids

VOCAB, EOS = 8, 2


class ScriptedModel:
    """Chain and head in one: answers token 5 twice, then prefers end-of-sequence."""

    def embed_tokens(self, input_ids, position_ids):
        return input_ids.unsqueeze(-1).float()

    def forward(self, hidden, attention_mask, position_ids, step, micro_batch, train, phase):
        return hidden, None

    def logits(self, hidden):
        generated = (hidden.shape[1] - 3)  # the prompt is 3 tokens long
        logits = torch.zeros(hidden.shape[0], hidden.shape[1], VOCAB)
        logits[:, -1, 5 if generated < 2 else EOS] = 1.0
        return logits


def tokenizer(pad_id):
    return SimpleNamespace(pad_id=pad_id, eos_id=EOS, chat=SimpleNamespace(prompt_ids=lambda prompt: [1, 3, 4]))


def test_an_answer_ends_at_eos_even_when_eos_is_also_the_padding_token():
    model = ScriptedModel()
    assert generate_ids(model, model, tokenizer(pad_id=EOS), ["a", "b"], max_new_tokens=6, kv_cache=False) == [[5, 5], [5, 5]]


def test_a_distinct_padding_token_is_never_generated():
    model = ScriptedModel()
    model.logits = lambda hidden: torch.nn.functional.one_hot(torch.zeros(hidden.shape[:2], dtype=torch.long), VOCAB).float()
    answers = generate_ids(model, model, tokenizer(pad_id=0), ["a"], max_new_tokens=3, kv_cache=False)
    assert answers == [[1, 1, 1]]  # token 0 (padding) is the model's favourite, token 1 the next: never 0
