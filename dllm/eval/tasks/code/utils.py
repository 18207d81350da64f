"""Helpers of the code tasks scored with the papers' instruct-model convention (README "Tasks and
records"; dllm/eval/code_postprocess.py). lm-eval imports this file by path, once per !function.
pass@1 runs each program locally (dllm/eval/code_exec.py), only under the code-execution opt-in.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | None = None) -> dict:
    from dllm.eval.code_exec import pass_at_k as run

    return run(references, predictions, k)


def humaneval_sanitized(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: each answer -> the sanitized program (prompt + fenced code), tests appended by the metric."""
    from dllm.eval.code_postprocess import humaneval_program

    return [[humaneval_program(doc, r) for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_sanitized_no_prompt(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: each answer -> the sanitized code alone, without the prompt before it (Fast-dLLM's rule)."""
    from dllm.eval.code_postprocess import humaneval_program

    return [[humaneval_program(doc, r, with_prompt=False) for r in resp] for resp, doc in zip(resps, docs)]


def mbpp_fewshot_samples() -> list[dict]:
    """lm-eval's three MBPP few-shot examples (task ids 2-4 of MBPP's prompt split)."""
    return [json.loads(line) for line in (DATA / "mbpp_fewshot.jsonl").read_text().splitlines() if line.strip()]


def mbpp_sanitized_results(doc: dict, results: list[str]) -> dict:
    """pass_at_1 of the answer's fenced code run with the problem's three asserts (the tests lm-eval's
    mbpp runs)."""
    from dllm.eval.code_exec import run_program
    from dllm.eval.code_postprocess import mbpp_program

    tests = "\n".join(doc["test_list"][:3])
    return {"pass_at_1": float(run_program(mbpp_program(results[0]) + "\n" + tests))}
