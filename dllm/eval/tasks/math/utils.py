"""lm-eval hooks of the MATH tasks (lm-eval's minerva_math utils need antlr 4.11; see
dllm/eval/math_scoring.py). lm-eval imports this file by path."""
from __future__ import annotations


def doc_to_text(doc: dict) -> str:
    from dllm.eval.math_scoring import doc_to_text as f

    return f(doc)


def process_docs(dataset):
    from dllm.eval.math_scoring import process_docs as f

    return f(dataset)


def list_fewshot_samples() -> list[dict]:
    from dllm.eval.math_scoring import list_fewshot_samples as f

    return f()


def list_fewshot_samples_lm_eval_0_4_9() -> list[dict]:
    from dllm.eval.math_scoring import list_fewshot_samples_lm_eval_0_4_9 as f

    return f()


def process_results(doc: dict, results: list[str]) -> dict:
    from dllm.eval.math_scoring import process_results as f

    return f(doc, results)
