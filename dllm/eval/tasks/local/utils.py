"""Helpers of the offline task twins (lm-eval imports this file by path, once per !function).

Data lives in ./data as ``<name>_<split>.jsonl``; paths are built from this file's location
because lm-eval resolves ``dataset_kwargs.data_files`` against the working directory.
"""
from __future__ import annotations

from pathlib import Path

from dllm.eval.local_data import load_jsonl_splits

DATA = Path(__file__).resolve().parent / "data"


def load_local(local_data: str | None = None, **_ignored):
    """A DatasetDict of every ``data/<local_data>_<split>.jsonl`` (custom_dataset hook)."""
    return load_jsonl_splits(DATA, local_data, "scripts/make_local_tasks.py")


# --- MATH (minerva_math's prompt and scoring; see dllm/eval/math_scoring.py) -----------------
def math_doc_to_text(doc: dict) -> str:
    from dllm.eval.math_scoring import doc_to_text

    return doc_to_text(doc)


def math_process_docs(dataset):
    from dllm.eval.math_scoring import process_docs

    return process_docs(dataset)


def math_fewshot_samples() -> list[dict]:
    from dllm.eval.math_scoring import list_fewshot_samples

    return list_fewshot_samples()


def math_process_results(doc: dict, results: list[str]) -> dict:
    from dllm.eval.math_scoring import process_results

    return process_results(doc, results)


# --- HumanEval (lm-eval's humaneval filter; pass@1 without evaluate.load) --------------------
def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | None = None) -> dict:
    from dllm.eval.code_exec import pass_at_k as run

    return run(references, predictions, k)


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_sanitized(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    from dllm.eval.code_postprocess import humaneval_program

    return [[humaneval_program(doc, r) for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_sanitized_no_prompt(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: each answer -> the sanitized code alone, without the prompt before it (Fast-dLLM's rule)."""
    from dllm.eval.code_postprocess import humaneval_program

    return [[humaneval_program(doc, r, with_prompt=False) for r in resp] for resp, doc in zip(resps, docs)]


# --- GSM8K as OpenCompass prompts and scores it (dllm/eval/gsm8k_scoring.py) ------------------
def gsm8k_opencompass_fewshot_samples() -> list[dict]:
    from dllm.eval.gsm8k_scoring import fewshot_samples

    return fewshot_samples()


def gsm8k_opencompass_process_results(doc: dict, results: list[str]) -> dict:
    from dllm.eval.gsm8k_scoring import process_results

    return process_results(doc, results)
