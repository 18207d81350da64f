"""GSM8K as OpenCompass prompts and scores it (dllm/eval/gsm8k_scoring.py, task dllm_gsm8k_opencompass
and its local twin): the prompt text, the answer read from a response, the comparison with the gold
number, and a run through the real runner and lm-eval."""
from __future__ import annotations

import pytest

from dllm.eval import gsm8k_scoring as gs


def test_the_four_worked_examples_are_the_configs():
    shots = gs.fewshot_samples()
    assert len(shots) == 4 and all(s["is_fewshot"] for s in shots)
    assert shots[0]["question"].startswith("Angelo and Melanie want to plan how many hours")
    assert [s["cot"].rsplit("The answer is ", 1)[1] for s in shots] == ["4\n", "201\n", "140\n", "146\n"]


@pytest.mark.parametrize("response, answer", [
    ("3 + 4 = 7.\nThe answer is 7\n\n", "7"),
    ("It costs 12.50 dollars, so -3 left", "-3"),
    ("He paid 2.5 each", "2.5"),
    ("The answer is 1,000", "000"),  # commas are not removed: OpenCompass reads 000
    ("The answer is 18\nQuestion: what is 99?", "18"),  # only the text before "Question:"
    ("No number here.", None),
])
def test_the_answer_is_the_last_number_before_the_next_question(response, answer):
    assert gs.response_answer(response) == answer


@pytest.mark.parametrize("prediction, gold, equal", [
    ("18", "18", True), ("18.0", "18", True), ("18.0000001", "18", True), ("18.5", "18", False),
    ("000", "1000", False), (None, "5", False), ("-3", "-3", True),
])
def test_a_prediction_equals_the_gold_number_as_string_or_within_1e_6(prediction, gold, equal):
    assert gs.is_equal(prediction, gold) is equal


def test_gold_is_the_number_after_the_marker_without_commas():
    assert gs.gold_answer("Half of 2,400 is 1,200.\n#### 1,200") == "1200"
    assert gs.process_results({"answer": "so\n#### 1,200"}, ["The answer is 1200"]) == {"exact_match": 1.0}
    assert gs.process_results({"answer": "so\n#### 1,200"}, ["The answer is 1,200"]) == {"exact_match": 0.0}


def test_the_prompt_is_the_configs_rounds_joined_by_newlines():
    """OpenCompass joins the HUMAN / BOT rounds of gsm8k_gen_17d0dc by "\\n" for a model without a
    meta template; lm-eval builds the same text from the task's delimiters."""
    from lm_eval.tasks import TaskManager

    from dllm.eval.runner import resolve_include_path

    manager = TaskManager(include_path=resolve_include_path("local"), include_defaults=False)
    task = manager.load(["gsm8k_local_opencompass"])["tasks"]["gsm8k_local_opencompass"]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    ask = "Question: {}\nLet's think step by step\nAnswer:"
    rounds = [text for s in gs.fewshot_samples() for text in (ask.format(s["question"]), s["cot"])]
    for instance, doc in zip(task.instances, task.test_docs()):
        assert instance.args[0] == "\n".join([*rounds, ask.format(doc["question"])])
        assert instance.args[1]["until"] == ["Question"]
    code = TaskManager(include_path=resolve_include_path("gsm8k"), include_defaults=False)
    hub, local = (m.task_index[n].cfg for m, n in ((code, "dllm_gsm8k_opencompass"), (manager, "gsm8k_local_opencompass")))
    for key in ("doc_to_text", "doc_to_target", "target_delimiter", "fewshot_delimiter", "generation_kwargs", "num_fewshot"):
        assert hub[key] == local[key], key
