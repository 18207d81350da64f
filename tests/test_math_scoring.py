"""MATH scoring (dllm/eval/math_scoring.py): answer extraction, Minerva normalisation and
equivalence on hand cases, the lm-eval hooks, and agreement with lm-eval's own minerva_math
functions (read from the installed lm-eval as an oracle; its module cannot be imported here)."""
from __future__ import annotations

import ast
import importlib.util
import random
import re
import signal
import time
from pathlib import Path

import pytest

from dllm.eval import math_scoring as ms

FINAL = "Final Answer: The final answer is {}. I hope it is correct."


# --- extraction ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "generation, expected",
    [
        ("So x = 3.\n" + FINAL.format("$3$"), "$3$"),
        (FINAL.format("$\\frac{1}{2}$") + "\n\nProblem:", "$\\frac{1}{2}$"),
        ("Final Answer: The final answer is $7$. ", "$7$"),  # cut before the closing sentence
        (FINAL.format("$1$") + "\n" + FINAL.format("$2$"), "$1$"),  # the first one counts
        ("Final Answer: The final answer is $5$ I hope it is correct.", "$5"),  # Minerva's quirk
        ("The answer is $\\boxed{4}$.", ms.INVALID_ANSWER),  # no "Final Answer" sentence
        ("", ms.INVALID_ANSWER),
    ],
)
def test_extract_final_answer(generation, expected):
    assert ms.extract_final_answer(generation) == expected


def test_boxed_fallback_is_opt_in():
    generation = "Thus $x = \\boxed{\\frac{3}{4}}$."
    assert ms.extract_final_answer(generation) == ms.INVALID_ANSWER
    assert ms.extract_final_answer(generation, boxed_fallback=True) == "\\frac{3}{4}"
    assert ms.extract_final_answer("no answer", boxed_fallback=True) == ms.INVALID_ANSWER


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),  # nested braces stay whole
        ("$\\boxed{1}$ or rather $\\boxed{\\{2, 3\\}}$", "\\{2, 3\\}"),  # the last box
        ("\\fbox{7}", "7"),
        ("the answer is $\\boxed 5$, done", "5"),  # brace-less form runs to the next $
        ("$\\boxed{\\text{(A)}}$", "\\text{(A)}"),
        ("\\boxed{unclosed", None),
        ("no box at all", None),
    ],
)
def test_last_boxed(text, expected):
    assert ms.last_boxed(text) == expected


# --- normalisation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),  # shorthand braced
        ("-\\frac 34", "-\\frac{3}{4}"),
        ("\\dfrac{3}{4}", "\\dfrac{3}{4}"),  # \dfrac is kept (sympy reads both)
        ("\\dfrac34", "\\dfrac{3}{4}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("3\\sqrt[3]2", "3\\sqrt[3]{2}"),
        ("\\sqrt[3]{8}", "\\sqrt[3]{8}"),
        ("5 \\text{ cm}", "5"),
        ("5\\text{ cm}^2", "5"),
        ("12 \\mbox{ inches}", "12"),
        ("4 \\text{ ways}", "4"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("90 degrees", "90"),
        ("\\$18.90", "18.90"),
        ("18 dollars", "18"),
        ("10,000", "10000"),
        ("\\$1,\\!000", "1000"),
        ("1{,}000{,}000", "1000000"),
        ("0,1", "0,1"),  # a pair, not a thousands separator
        ("(1, 2)", "(1,2)"),
        ("0.50", "0.50"),  # trailing zeros are kept (sympy equates 0.50 and 0.5)
        ("x = 5", "5"),  # only what follows the last "="
        ("y = 2x + 3", "2x+3"),
        ("$[2,5)$", "[2,5)"),
        ("The answer is $24$ exactly", "24"),  # the first $...$ span only
        ("\\boxed{5}", "5"),
        ("\\text{(C)}", "(C)"),
        ("\\textbf{Tuesday}", "Tuesday"),
        ("0.\\overline{3}", "0.3"),
        ("\\left(3, \\frac{\\pi}{2}\\right)", "\\left(3,\\frac{\\pi}{2}\\right)"),  # "ft" of \left kept
        ("1, 2, \\text{and } 3", "1,2,3"),
        ("8\\text{th}", "8th"),
        ("2\\mathrm{th}", "2"),
        ("1, 2, \\ldots, 9", "1,2,,9"),
    ],
)
def test_normalize_answer(answer, expected):
    assert ms.normalize_answer(answer) == expected


def test_fewshot_answers_agree_with_their_boxes():
    samples = ms.list_fewshot_samples()
    assert len(samples) == 4 and all(s["few_shot"] == "1" for s in samples)
    for sample in samples:
        extracted = ms.normalize_answer(ms.extract_final_answer(sample["solution"]))
        assert extracted == ms.gold_answer(sample["solution"])
    assert [ms.gold_answer(s["solution"]) for s in samples] == ["[2,5)", "24", "16", "-\\frac{2}{3}"]


# --- equivalence -----------------------------------------------------------------------------
def _sympify_parser(text: str):
    import sympy

    return sympy.sympify(text.replace("\\frac{", "(").replace("}{", ")/(").replace("}", ")"))


def test_answers_match_without_a_parser(monkeypatch):
    monkeypatch.setattr(ms, "_latex_parser", lambda: None)
    assert ms.answers_match("\\frac{1}{2}", "\\frac{1}{2}")
    assert not ms.answers_match("0.5", "\\frac{1}{2}")
    assert not ms.answers_match(ms.INVALID_ANSWER, ms.INVALID_ANSWER)
    assert not ms.answers_match("", "")


def test_answers_match_symbolically(monkeypatch):
    monkeypatch.setattr(ms, "_latex_parser", lambda: _sympify_parser)
    assert ms.answers_match("0.5", "\\frac{1}{2}")
    assert ms.answers_match("2*(x+1)", "2*x+2")
    assert not ms.answers_match("0.5", "\\frac{1}{3}")
    assert not ms.answers_match("(", "1")  # unparsable: no match, no error


def test_symbolic_comparison_times_out(monkeypatch):
    def slow(text):
        time.sleep(5)
        return 0

    monkeypatch.setattr(ms, "_latex_parser", lambda: slow)
    start = time.monotonic()
    assert not ms.symbolically_equal("1", "2", timeout_s=1)
    assert time.monotonic() - start < 4


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="POSIX timers")
def test_time_limit_keeps_an_outer_timer():
    def outer(signum, frame):  # pragma: no cover - must not fire here
        raise AssertionError("outer timer fired")

    handler = signal.signal(signal.SIGALRM, outer)
    saved = signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        with ms._time_limit(5):
            pass
        assert 50 < signal.getitimer(signal.ITIMER_REAL)[0] <= 60
        assert signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if saved[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *saved)


# Equivalent answer pairs a string match misses (the default install scores them with
# latex2sympy2_extended and math-verify, both dependencies).
EQUIVALENT = [
    ("0.5", "\\frac12"), ("\\dfrac12", "\\frac{1}{2}"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("\\frac{-2}{3}", "-\\frac{2}{3}"), ("\\pi/2", "\\frac{\\pi}{2}"), ("(x+1)^2", "x^2+2x+1"), ("\\frac{3}{4}", "0.75"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("\\tfrac{1}{3}", "\\frac13"), ("-\\frac{1}{4}", "-0.25"), ("\\frac{\\pi}{6}", "\\pi/6"),
]


@pytest.mark.parametrize("answer, gold", EQUIVALENT)
def test_equivalent_answers_score_by_default(answer, gold):
    doc = ms.process_doc({"problem": "p", "solution": f"so $\\boxed{{{gold}}}$"})
    assert ms.process_results(doc, [FINAL.format(f"${answer}$")]) == {"exact_match": 1, "math_verify": 1}


def test_latex2sympy_equivalences():
    assert ms.answers_match("0.5", "\\frac{1}{2}")
    assert ms.answers_match("\\dfrac{1}{2}", "\\frac{1}{2}")
    assert ms.answers_match("0.50", "0.5")
    assert ms.answers_match("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}")
    assert not ms.answers_match("2", "3")
    assert not ms.answers_match("(1,2)", "(1,3)")
    assert not ms.answers_match("[2,5)", "[2,5]")
    assert not ms.answers_match("X+1", "x+1")  # case-sensitive, like sympy's parse_latex
    # A one-token denominator, as parse_latex reads it (MATH-500's gold "\\frac{270}7\\text{ degrees}")
    assert ms.answers_match("\\frac{270}{7}", ms.normalize_answer("\\frac{270}7\\text{ degrees}"))
    assert not ms.answers_match("\\frac{270}{8}", "\\frac{270}7")
    # a numerator with braces of its own (lm-eval's is_equiv: True for each)
    for braced, bare in [("\\frac{2\\sqrt{3}}{3}", "\\frac{2\\sqrt{3}}3"), ("\\frac{\\sqrt{6}}{3}", "\\frac{\\sqrt{6}}3"),
                         ("\\frac{\\sqrt{2}}{4}", "\\frac{\\sqrt{2}}4")]:
        assert ms.answers_match(braced, ms.normalize_answer(bare)), bare
    assert not ms.answers_match("\\frac{2\\sqrt{3}}{4}", "\\frac{2\\sqrt{3}}3")


# lm-eval 0.4.13's is_equiv (sympy 1.14's parse_latex on antlr 4.11) on normalised answers where
# latex2sympy2_extended alone reads the string otherwise: as_parse_latex_reads gives its verdicts.
LM_EVAL_VERDICTS = [
    ("5}", "5", True),  # Minerva's split at "=" of \\boxed{x = 5}; parse_latex stops at the stray "}"
    ("-\\frac{1}{2}}", "-\\frac{1}{2}", True), ("\\sqrt{2}}", "\\sqrt{2}", True), ("5)", "5", True),
    ("1,2", "1", True), ("1,3", "1,2", True), ("2,1", "1,2", False),  # the first item only
    ("1,234.5", "1234.5", True),  # a thousands separator is no end
    ("\\{5\\}", "5", True),  # \\{ \\} group (latex2sympy2_extended: a set)
    ("2\\frac{1}{2}", "\\frac{5}{2}", False), ("6\\frac{2}{3}", "\\frac{20}{3}", False),
    ("2\\frac{1}{2}", "1", True),  # a product, not a mixed number
    (".5", "0.5", False), ("0.5", ".5", False), ("5.", "5", False), ("x.", "x", True), ("1.2.3", "1.2", True),
    ("\\frac{1}x", "\\frac{1}{x}", False), ("\\frac{3}\\pi", "\\frac{3}{\\pi}", False),  # a bare denominator is one digit
    ("\\frac{270}7", "\\frac{270}{7}", True),
    ("(1\\})", "1\\}", False),  # a bracket closed by another kind
    ("4210", "4210_{5}", True), ("(204_5)", "204_5", False),  # a number's subscript ends it
    ("\\frac32", "1.5", True), ("\\frac{270}7.", "\\frac{270}{7}", True),  # one-DIGIT operands
    ("\\log_28", "3", True), ("\\log_{28}x", "\\log_28x", True),  # a subscript leaves the last digit only when needed
    ("1\\pm\\sqrt{19})", "1\\pm\\sqrt{19}", True), ("\\pm3", "3", False),  # \\pm: a symbol there
    ("x\\in[-2,7]", "x\\in[0,1]", True), ("2(1,2)", "2", True), ("x(1,2)", "x", False), ("-[1,2]", "-1", False),
    ("0.15.", "0.1", True), ("1.25.", "1.25", False),  # two decimals then ".": one digit early
    ("x+", "x", True), ("2\\cdot", "2", True),  # a trailing operator is dropped
    ("\\$5", "5", False), ("5}\\$", "5", True),  # \\$ has no token (after the end it is not read)
]


@pytest.mark.parametrize("answer, gold, lm_eval", LM_EVAL_VERDICTS)
def test_symbolic_verdicts_are_lm_evals(answer, gold, lm_eval):
    assert ms.answers_match(answer, gold) is lm_eval


# --- lm-eval hooks ---------------------------------------------------------------------------
def test_doc_to_text_and_process_doc():
    doc = {"problem": "What is $1+{1}$?", "solution": "It is $\\boxed{10,000}$ dollars.", "level": "Level 1"}
    assert ms.doc_to_text(doc) == "Problem:\nWhat is $1+{1}$?\n\nSolution:"
    assert ms.process_doc(doc) == {"problem": doc["problem"], "solution": doc["solution"], "answer": "10000"}
    assert ms.process_doc({**doc, "few_shot": "1"})["few_shot"] is True
    assert ms.process_doc({"problem": "p", "solution": "no box"})["answer"] == ""


@pytest.mark.parametrize(
    "generation, correct",
    [
        (FINAL.format("$10{,}000$"), 1),
        (FINAL.format("$10,000$ dollars"), 1),
        (FINAL.format("$\\$10,000$"), 1),
        ("We get 10000.\n" + FINAL.format("$x = 10000$"), 1),
        (FINAL.format("$9,999$"), 0),
        ("The answer is $\\boxed{10000}$.", 0),  # no "Final Answer" sentence: lm-eval scores 0
        ("", 0),
    ],
)
def test_process_results(generation, correct):
    doc = ms.process_doc({"problem": "p", "solution": "The total is $\\boxed{10,000}$."})
    scores = ms.process_results(doc, [generation])
    assert scores["exact_match"] == correct and set(scores) == {"exact_match", "math_verify"}


def test_process_results_fraction():
    doc = ms.process_doc({"problem": "p", "solution": "So $p = \\boxed{\\dfrac{2}{3}}$."})
    assert doc["answer"] == "\\dfrac{2}{3}"
    assert ms.process_results(doc, [FINAL.format("$\\dfrac23$")]) == {"exact_match": 1, "math_verify": 1}
    assert ms.process_results(doc, [FINAL.format("$\\dfrac{3}{2}$")]) == {"exact_match": 0, "math_verify": 0}


# --- agreement with lm-eval's minerva_math functions -----------------------------------------
_ORACLE_NAMES = {"last_boxed_only_string", "remove_boxed", "get_unnormalized_answer",
                 "normalize_final_answer", "SUBSTITUTIONS", "REMOVED_EXPRESSIONS"}


def _lm_eval_oracle() -> dict:
    """lm-eval's extraction and normalisation functions, compiled from its installed source
    without running its module body (which asserts antlr 4.11)."""
    spec = importlib.util.find_spec("lm_eval")
    path = Path(spec.origin).parent / "tasks" / "minerva_math" / "utils.py"
    if not path.exists():
        pytest.skip("lm-eval's minerva_math utils not found")
    tree = ast.parse(path.read_text())
    keep = []
    for node in tree.body:
        names = {node.name} if isinstance(node, ast.FunctionDef) else {
            t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}
        if names & _ORACLE_NAMES:
            keep.append(node)
    namespace = {"re": re}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    assert _ORACLE_NAMES <= namespace.keys()
    return namespace


_PIECES = (
    "square", "ways", "ft", "\\left(", "\\right)", "cm", "units", " ", "\\ ", "$", "\\$", "=", "5",
    "10", ",", "000", ".", "\\text{", "}", "{", "\\textbf{", "\\overline{", "\\boxed{", "\\frac",
    "12", "\\sqrt", "[3]", "a ", "an ", "mbox", "\\text{and}", "\\text{m}", "\\ldots", "^\\circ",
    "^{\\circ}", ",\\!", "{,}", '"', "-", "x", "\\mathrm{th}", "\\text{s}", "\n", "points", "sue",
    "\\pi", "degrees", "\\dfrac", "(", ")", "\\", "s", "\\fbox{", "\\boxed ",
    "Final Answer: The final answer is", ". I hope it is correct.", " I hope it is correct",
)


def test_agrees_with_lm_eval_minerva_functions():
    oracle = _lm_eval_oracle()
    rng = random.Random(0)
    texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for text in texts:
        assert ms.normalize_answer(text) == oracle["normalize_final_answer"](text), text
        assert ms.extract_final_answer(text) == oracle["get_unnormalized_answer"](text), text
        boxed = oracle["last_boxed_only_string"](text)
        if boxed is not None:
            try:
                expected = oracle["remove_boxed"](boxed)
            except AssertionError:  # lm-eval crashes on these; we return the content
                continue
            assert ms.last_boxed(text) == expected, text


def test_lm_eval_0_4_9_fewshot_text_differs_by_its_three_typos():
    """d²Cache's Table 1 ran lm-eval 0.4.9, whose few-shot examples had three typos 0.4.13 fixed; the
    task dllm_math500_fewshot_0_4_9 gives that text, everything else as dllm_math500."""
    from lm_eval.tasks import TaskManager

    from dllm.eval.runner import resolve_include_path

    fixed, typos = ms.list_fewshot_samples(), ms.list_fewshot_samples_lm_eval_0_4_9()
    changed = [(f[k], t[k]) for f, t in zip(fixed, typos) for k in ("problem", "solution") if f[k] != t[k]]
    assert len(changed) == 3
    assert changed[0] == (fixed[0]["problem"], fixed[0]["problem"] + "}")  # "$.}"
    for before, after in changed[1:]:  # a LaTeX line break "\\" + newline written as "\" + newline
        assert before.count("\\\\\n") == after.count("\\\\\n") + 1 and len(after) == len(before) - 1
    manager = TaskManager(include_path=resolve_include_path("math"), include_defaults=False)
    old, new = (manager.task_index[name].cfg for name in ("dllm_math500", "dllm_math500_fewshot_0_4_9"))
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} == {"task", "fewshot_config"}
    # lm-eval names each hook "<folder>/utils.<function>": call the ones the two tasks name
    hooks = importlib.util.spec_from_file_location("math_task_utils", Path(old["doc_to_text"]).parent / "utils.py")
    utils = importlib.util.module_from_spec(hooks)
    hooks.loader.exec_module(utils)
    hook = lambda cfg: getattr(utils, cfg["fewshot_config"]["samples"].rsplit(".", 1)[1])  # noqa: E731
    assert hook(old)() == fixed and hook(new)() == typos
