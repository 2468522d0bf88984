"""Greedy generation's stopping rule (the decoding loop the cached and uncached paths share), on a stand-in
model: a tokenizer that pads with its end-of-turn token (as many chat tokenizers do, e.g. SmolLM2's
<|im_end|>) must still be able to end an answer."""

from types import SimpleNamespace

import torch

from coordinator.generation import generate_ids

VOCAB, EOS = 8, 2


class ScriptedModel:
    """Chain and head in one: answers token 5 twice, then prefers end-of-sequence."""

    head = SimpleNamespace(weight=torch.zeros(VOCAB, 1))  # sizes a decoding step's work (coordinator.generation)

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


def test_a_small_models_decoding_runs_on_one_thread_and_a_large_heads_on_the_trainers_own():
    """swarm.call_threads' rule on the trainer: a step's head over one new position per prompt decides, and the
    trainer's setting is back afterwards."""
    from swarm.call_threads import SMALL_CALL_MULTIPLY_ADDS

    seen = []

    class Recording(ScriptedModel):
        def logits(self, hidden):
            seen.append(torch.get_num_threads())
            return super().logits(hidden)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = Recording()
        assert generate_ids(small, small, tokenizer(pad_id=0), ["a", "b"], max_new_tokens=2, kv_cache=False) == [[5, 5]] * 2
        large = Recording()
        large.head = SimpleNamespace(weight=torch.zeros(SMALL_CALL_MULTIPLY_ADDS // 2, 1))  # 2 prompts: at the bound
        generate_ids(large, large, tokenizer(pad_id=0), ["a", "b"], max_new_tokens=2, kv_cache=False)
        assert seen == [1, 1, 2, 2], seen
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
