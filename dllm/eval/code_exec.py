"""pass@1 for code tasks without Hugging Face ``evaluate.load("code_eval")`` (a Hub download).

Model-written programs run only when the user opted in: the task config's
``allow_code_execution: true`` makes the runner set ``HF_ALLOW_CODE_EVAL=1`` (the same switch
``code_eval`` uses); without it :func:`run_program` refuses. Each program runs in a separate,
isolated Python process (``-I``, empty temporary working directory, a wall-clock timeout) —
a guard against accidents, not a sandbox against malicious code.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

OPT_IN = "HF_ALLOW_CODE_EVAL"


class CodeExecutionNotAllowed(RuntimeError):
    pass


def check_allowed() -> None:
    if os.environ.get(OPT_IN) != "1":
        raise CodeExecutionNotAllowed(
            f"refusing to execute model-written code: {OPT_IN} is not '1'. Opt in with the task config key "
            "allow_code_execution=true (e.g. task.allow_code_execution=true), which sets it."
        )


def run_program(program: str, timeout_s: float = 10.0) -> bool:
    """True when ``program`` exits with status 0 within ``timeout_s`` seconds."""
    check_allowed()
    with tempfile.TemporaryDirectory(prefix="dllm-code-") as cwd:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout_s,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def pass_at_k_estimate(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one problem from n samples with ``correct`` passing (Chen et al.,
    2021): 1 - C(n - c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict:
    """Same interface and result keys as ``code_eval``'s compute: ``{"pass@k": mean over problems}``
    for each k, every candidate of a problem run against its test."""
    ks = [1] if k is None else ([k] if isinstance(k, int) else list(k))
    per_problem = []
    for test, candidates in zip(references, predictions):
        correct = sum(run_program(candidate + "\n" + test) for candidate in candidates)
        per_problem.append((len(candidates), correct))
    return {
        f"pass@{kk}": sum(pass_at_k_estimate(n, c, kk) for n, c in per_problem) / len(per_problem) if per_problem else 0.0
        for kk in ks
    }
