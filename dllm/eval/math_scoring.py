"""MATH scoring as lm-eval's ``minerva_math`` does it, without its antlr 4.11 requirement.

lm-eval's ``minerva_math/utils.py`` asserts ``antlr4-python3-runtime==4.11`` at import time,
which conflicts with hydra-core (antlr 4.9.*), so its tasks cannot even be loaded beside Hydra.
The functions below are lm-eval 0.4.13's answer extraction and normalisation, copied verbatim
(MIT, EleutherAI; originally Lewkowycz et al. 2022, appendix D), with one change in
:func:`is_equiv`: the symbolic comparison uses sympy's ``parse_latex`` when it works (antlr
4.11), else ``latex2sympy2_extended`` (the ``math`` extra, antlr 4.9.3), else only the exact
comparison of the normalised strings (identical strings already count as equal in lm-eval).

``exact_match`` is therefore lm-eval's metric; ``math_verify`` (Hugging Face's math-verify,
the ``math`` extra) is reported beside it when the package is installed.
"""
from __future__ import annotations

import logging
import re
import signal
import threading

log = logging.getLogger(__name__)

INVALID_ANSWER = "[invalidanswer]"


def doc_to_text(doc: dict) -> str:
    return "Problem:" + "\n" + doc["problem"] + "\n\n" + "Solution:"


def process_doc(doc: dict) -> dict:
    out = {
        "problem": doc["problem"],
        "solution": doc["solution"],
        "answer": normalize_final_answer(remove_boxed(last_boxed_only_string(doc["solution"]))),
    }
    if doc.get("few_shot") is not None:
        out["few_shot"] = True
    return out


def process_docs(dataset):
    return dataset.map(process_doc)


def list_fewshot_samples() -> list[dict]:
    # lm-eval's minerva_math few-shot examples (the four Minerva prompts), unchanged.
    return [
        {
            "problem": "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
            "solution": "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
            "few_shot": "1",
        },
        {
            "problem": "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
            "solution": "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
            "few_shot": "1",
        },
        {
            "problem": "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
            "solution": "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.",
            "few_shot": "1",
        },
        {
            "problem": "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
            "solution": "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
            "few_shot": "1",
        },
    ]


def math_verify_score(solution: str, candidate: str) -> int | None:
    """math-verify's verdict (1/0), or None when the ``math`` extra is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        return int(bool(verify(gold=parse(solution), target=parse(candidate))))
    except Exception as err:  # noqa: BLE001 - a parser failure scores 0, like lm-eval
        log.debug("math_verify failed: %s", err)
        return 0


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    candidate = results[0]
    answer = normalize_final_answer(get_unnormalized_answer(candidate))
    out = {"exact_match": int(is_equiv(answer, doc["answer"]))}
    verified = math_verify_score(doc["solution"], candidate)
    if verified is not None:
        out["math_verify"] = verified
    return out


# ----------------------------------------------------------------------------------------------
# lm-eval 0.4.13 minerva_math/utils.py (verbatim unless noted)
# ----------------------------------------------------------------------------------------------
def last_boxed_only_string(string: str) -> str | None:
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    i = idx
    right_brace_idx = None
    num_left_braces_open = 0
    while i < len(string):
        if string[i] == "{":
            num_left_braces_open += 1
        if string[i] == "}":
            num_left_braces_open -= 1
            if num_left_braces_open == 0:
                right_brace_idx = i
                break
        i += 1
    if right_brace_idx is None:
        return None
    return string[idx : right_brace_idx + 1]


def remove_boxed(s: str) -> str:
    if "\\boxed " in s:
        left = "\\boxed "
        assert s[: len(left)] == left
        return s[len(left) :]
    left = "\\boxed{"
    assert s[: len(left)] == left
    assert s[-1] == "}"
    return s[len(left) : -1]


class timeout:
    """SIGALRM timeout (main thread only; elsewhere a no-op, where lm-eval would crash)."""

    def __init__(self, seconds=1, error_message="Timeout"):
        self.seconds = seconds
        self.error_message = error_message
        self.active = threading.current_thread() is threading.main_thread()

    def handle_timeout(self, signum, frame):
        raise TimeoutError(self.error_message)

    def __enter__(self):
        if self.active:
            signal.signal(signal.SIGALRM, self.handle_timeout)
            signal.alarm(self.seconds)

    def __exit__(self, exc_type, value, traceback):
        if self.active:
            signal.alarm(0)


def _parse_latex():
    """A LaTeX -> sympy parser that works here (see the module docstring), or None."""
    try:
        from sympy.parsing.latex import parse_latex

        parse_latex("1")  # raises ImportError without antlr 4.11
        return parse_latex
    except Exception:  # noqa: BLE001
        pass
    try:
        from latex2sympy2_extended import latex2sympy

        return latex2sympy
    except Exception:  # noqa: BLE001
        return None


def is_equiv(x1: str, x2: str) -> bool:
    """x1 and x2 are normalized latex strings (lm-eval's rule; the parser is the change)."""
    if isinstance(x1, str) and x1 and x1 == x2:
        return True
    parse = _parse_latex()
    if parse is None or x1 == INVALID_ANSWER:
        return False
    import sympy

    try:
        with timeout(seconds=5):
            try:
                diff = parse(x1) - parse(x2)
            except Exception:  # noqa: BLE001 - unparsable or not subtractable: not equal
                return False
            try:
                return sympy.simplify(diff) == 0
            except Exception:  # noqa: BLE001
                return False
    except TimeoutError:
        return False


def get_unnormalized_answer(text: str) -> str:
    end_seq = "I hope it is correct."
    text += end_seq
    match = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", text)
    if match:
        return match.group(1).strip()
    return INVALID_ANSWER


SUBSTITUTIONS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]


def normalize_final_answer(final_answer: str) -> str:
    """Normalize a final answer to a quantitative reasoning question (Lewkowycz et al. 2022)."""
    final_answer = final_answer.split("=")[-1]
    for expr in REMOVED_EXPRESSIONS:
        if expr.isalpha():
            final_answer = re.sub(rf"(?<!\\)\b{expr}\b", "", final_answer)
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        if expr.isalpha():
            segments = re.split(r"(\\[a-zA-Z]+)", final_answer)
            for i in range(0, len(segments), 2):
                segments[i] = segments[i].replace(expr, "")
            final_answer = "".join(segments)
        else:
            final_answer = final_answer.replace(expr, "")
    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", final_answer):
        final_answer = final_answer.replace(",", "")
    return final_answer
