"""pass@1 for code tasks without Hugging Face ``evaluate.load("code_eval")`` (a Hub download).

Model-written programs run only when the user opted in: the task config's
``allow_code_execution: true`` makes the runner set ``HF_ALLOW_CODE_EVAL=1`` (the same switch
``code_eval`` uses); without it :func:`run_program` refuses. Each program runs in a separate,
isolated Python process (``-I``, empty temporary working directory, a wall-clock timeout) —
a guard against accidents, not a sandbox against malicious code.
"""
from __future__ import annotations

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


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict:
    """Same interface and result keys as ``code_eval``'s compute (``{"pass@1": ...}``), k = 1 only."""
    k = [1] if k is None else ([k] if isinstance(k, int) else list(k))
    if k != [1]:
        raise ValueError(f"k={k}: only pass@1 is implemented (one greedy sample per problem)")
    scores = []
    for test, candidates in zip(references, predictions):
        scores.append(float(run_program(candidates[0] + "\n" + test)))
    return {"pass@1": sum(scores) / len(scores) if scores else 0.0}
