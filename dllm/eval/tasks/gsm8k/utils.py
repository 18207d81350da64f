"""lm-eval hooks of dllm_gsm8k_opencompass (dllm/eval/gsm8k_scoring.py). lm-eval imports this file by path."""
from __future__ import annotations


def fewshot_samples() -> list[dict]:
    from dllm.eval.gsm8k_scoring import fewshot_samples as f

    return f()


def process_results(doc: dict, results: list[str]) -> dict:
    from dllm.eval.gsm8k_scoring import process_results as f

    return f(doc, results)
