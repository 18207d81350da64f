"""GSM8K as OpenCompass 0.4.2 (the version Sparse-dLLM's README pins) prompts and scores it: its
4-shot config ``gsm8k_gen_17d0dc`` (the one Sparse-dLLM's Table 1 ran, as
``gsm8k_gen_17d0dc_maxoutlen_256``), ``opencompass/models/base.py``'s template parser and
``opencompass/datasets/gsm8k.py``.

- Prompt: four worked examples, then the question, each as "Question: <q>\\nLet's think step by
  step\\nAnswer:", the examples' answers ending "The answer is N\\n"; the rounds joined by "\\n"
  (OpenCompass' template parser for a model without a meta template). lm-eval builds that text from
  the task's ``target_delimiter`` / ``fewshot_delimiter`` "\\n" (dllm_gsm8k_opencompass.yaml).
- Answer: the last number (``-?\\d+\\.\\d+|-?\\d+``) of the response before its first "Question:";
  commas are not removed, so "1,000" reads as 000 (``gsm8k_postprocess``).
- Gold: the text after "#### ", commas removed (``gsm8k_dataset_postprocess``).
- Correct: the same string, or a number within 1e-6 of the gold integer (``Gsm8kEvaluator.is_equal``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

FEWSHOT = Path(__file__).resolve().parent / "tasks" / "gsm8k" / "data" / "opencompass_fewshot.jsonl"
NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def fewshot_samples() -> list[dict]:
    """The config's four examples: ``question``, ``cot`` (the worked answer) and ``is_fewshot``."""
    return [json.loads(line) for line in FEWSHOT.read_text().splitlines() if line.strip()]


def response_answer(text: str) -> str | None:
    """The number OpenCompass reads from a response (None: there is none, its "NULL")."""
    numbers = NUMBER.findall(text.split("Question:")[0])
    return numbers[-1] if numbers else None


def gold_answer(answer: str) -> str:
    """The reference number of a GSM8K ``answer`` field."""
    return answer.split("#### ")[1].replace(",", "")


def is_equal(prediction: str | None, gold: str) -> bool:
    if prediction == gold:
        return True
    try:
        return abs(float(prediction) - int(gold)) < 1e-6
    except (TypeError, ValueError, OverflowError):  # no number read, or a gold that is no integer
        return False


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(is_equal(response_answer(results[0]), gold_answer(doc["answer"])))}
