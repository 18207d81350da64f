"""Scoring of MATH generations (prompt, answer extraction, normalisation, equivalence).

Our own implementation of the scoring specified by Minerva (Lewkowycz et al. 2022, appendix D),
with the behaviour of lm-eval 0.4.13's ``minerva_math`` task as the reference: same prompt, same
four few-shot examples, same answer extraction and normalisation, so ``exact_match`` is
comparable with lm-eval's. We cannot import lm-eval's module instead: it asserts
``antlr4-python3-runtime==4.11`` at import time, and hydra-core needs antlr 4.9.

How an answer is scored:

1. *Extraction.* The few-shot examples end with "Final Answer: The final answer is X. I hope it
   is correct."; X is the model's answer (:func:`extract_final_answer`). The gold answer is the
   content of the last ``\\boxed{...}`` of the reference solution (:func:`last_boxed`).
2. *Normalisation* (:func:`normalize_answer`): keep what follows the last "=", drop unit and
   filler words, spaces, ``\\$``, degree signs and similar noise, unwrap ``\\text{}``,
   ``\\textbf{}``, ``\\overline{}``, ``\\boxed{}`` and the first ``$...$``, brace the
   ``\\frac12`` / ``\\sqrt2`` shorthands and remove thousands separators.
3. *Equivalence* (:func:`answers_match`): equal normalised strings, else sympy finds the
   difference of the two parsed expressions to be zero. lm-eval parses with sympy's
   ``parse_latex`` (antlr 4.11); we use ``latex2sympy2_extended`` (a dependency, antlr
   4.9.3, which installs beside hydra-core), on the part of the string parse_latex reads, rewritten
   where the two grammars differ (:func:`as_parse_latex_reads`: parse_latex stops at a stray
   ``}``, a comma or a number's subscript, multiplies a whole number into a following fraction,
   reads ``\\pm`` as a symbol, cannot read ``.5``).

``math_verify`` (Hugging Face's math-verify, a dependency) is reported beside ``exact_match``,
on the raw generation and solution, as lm-eval does.

Where ``exact_match`` can differ from lm-eval's (extraction and normalisation agree exactly;
tests/test_math_scoring.py checks them against lm-eval's installed functions):

* only in the symbolic step, i.e. for answers whose normalised strings differ. On 9,387 pairs of
  normalised answers (MATH-500's gold answers, each against itself with a stray bracket, comma,
  dot, ``\\{ \\}`` or leading digit added, against other gold answers, and hand-written forms) the
  verdicts of lm-eval 0.4.13's ``is_equiv`` (antlr 4.11, sympy 1.14) and ours differed on 14 (1,779
  before :func:`as_parse_latex_reads`), all matrices: parse_latex reads a normalised
  ``\\begin{pmatrix}1\\-2\\end{pmatrix}`` (its row breaks cut to ``\\`` by the removal of ``"\\ "``) as
  a product of symbols (begin·p·m·a·t·r·i·x·…), equal to itself with a stray character added,
  latex2sympy2_extended as a Matrix, whose difference never compares equal to 0. Also left:
  ``12.`` is 1 there (ours: unreadable), ``1.25.7`` is 1.2·5.7 (ours: 1.2), ``x(1,2)`` a function
  call (ours: unreadable), and a character without a token just after the end (``5,\\$``) still
  raises there;
* a gold solution without ``\\boxed{}`` (or with only ``\\fbox{}``) crashes lm-eval's
  ``process_docs``; here it gets the gold "" (never matched) or the ``\\fbox`` content;
* off the main thread lm-eval's SIGALRM timeout fails and every non-identical pair scores 0;
  here the comparison runs without a time limit.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import signal
import threading
import time

log = logging.getLogger(__name__)

INVALID_ANSWER = "[invalidanswer]"
PROMPT = "Problem:\n{problem}\n\nSolution:"
SYMBOLIC_TIMEOUT_S = 5

# The four Minerva few-shot examples (problem, worked solution), as used by lm-eval.
FEWSHOT_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
    ),
)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
_CLOSING = "I hope it is correct."
# The answer is everything between "is" and the character before " I hope it is correct",
# on one line; "." is deliberately any character (lm-eval behaves so: "$5$ I hope ..." loses
# the closing "$"). The closing sentence is appended before the search, so a generation cut
# right after "The final answer is $5$. " still yields "$5$".
_FINAL_ANSWER_RE = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if none.

    Braces are balanced, so nested groups stay whole. The brace-less form ``\\boxed 5`` wins
    when present anywhere; it runs to the next ``$`` (or the end of the text).
    """
    if "\\boxed " in text:
        return text.rsplit("\\boxed ", 1)[1].split("$", 1)[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    opening = None
    for pos in range(start, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
            if opening is None:
                opening = pos
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[opening + 1 : pos] if opening is not None else None
    return None


def extract_final_answer(generation: str, boxed_fallback: bool = False) -> str:
    """The answer X of "Final Answer: The final answer is X. I hope it is correct.".

    Without that sentence: :data:`INVALID_ANSWER`, as in Minerva and lm-eval; with
    ``boxed_fallback`` the last ``\\boxed{}`` of the generation is taken first (not lm-eval's
    behaviour, so not used by :func:`process_results`).
    """
    found = _FINAL_ANSWER_RE.search(generation + _CLOSING)
    if found:
        return found.group(1).strip()
    if boxed_fallback:
        boxed = last_boxed(generation)
        if boxed is not None:
            return boxed
    return INVALID_ANSWER


# ---------------------------------------------------------------------------------------------
# Normalisation. The word lists and the rule order are the paper's (appendix D); lm-eval 0.4.13
# refines them and we follow it: a whole-word unit pass first, command names ("\left") never
# stripped of unit letters, \sqrt[n]x braced, and only true thousands separators removed.
# ---------------------------------------------------------------------------------------------
# Literal replacements, applied in order after the first unit-word pass.
_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
# Removed after the replacements, in this order: unit / filler words (alphabetic entries) and
# LaTeX noise (the others, removed verbatim).
_DROPPED: tuple[str, ...] = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
_UNIT_WORDS = tuple(expr for expr in _DROPPED if expr.isalpha())
# First pass, while spaces still separate words: whole words only, and never a command name
# ("\left" keeps its "ft").
_WHOLE_WORD = {w: re.compile(rf"(?<!\\)\b{w}\b") for w in _UNIT_WORDS}
# Second pass, once spaces are gone ("5cm"): any occurrence outside a command name. The
# command alternative is tried first at each position and kept as is.
_GLUED_WORD = {w: re.compile(rf"(\\[a-zA-Z]+)|{w}") for w in _UNIT_WORDS}
# Regex rewrites, applied in order after the removals.
_REWRITES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r".*?\$(.*?)\$.*", r"$\1$"),  # keep only the first $...$ span of a line
        (r"\\text\{(.*?)\}", r"\1"),
        (r"\\textbf\{(.*?)\}", r"\1"),
        (r"\\overline\{(.*?)\}", r"\1"),
        (r"\\boxed\{(.*)\}", r"\1"),
        (r"frac([^{])(.)", r"frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
        (r"sqrt(\[[^\]]*\])(\w)", r"sqrt\1{\2}"),  # \sqrt[3]2 -> \sqrt[3]{2}
        (r"sqrt(?!\[)([^{])", r"sqrt{\1}"),  # \sqrt2 -> \sqrt{2}
    )
)
_GROUPED_INTEGER = re.compile(r"-?\d{1,3}(?:,\d{3})+")  # 10,000 (not the pair "0,1")


def _keep_command(match: re.Match) -> str:
    return match.group(1) or ""


def normalize_answer(answer: str) -> str:
    """Minerva's canonical form of a final answer (see the module docstring)."""
    text = answer.rsplit("=", 1)[-1]
    for word in _UNIT_WORDS:
        text = _WHOLE_WORD[word].sub("", text)
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    for expr in _DROPPED:
        glued = _GLUED_WORD.get(expr)
        text = glued.sub(_keep_command, text) if glued else text.replace(expr, "")
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    text = text.replace("$", "")
    if _GROUPED_INTEGER.fullmatch(text):
        text = text.replace(",", "")
    return text


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in the block after ``seconds`` (SIGALRM: main thread, POSIX only;
    elsewhere the block runs unlimited). A timer already armed (pytest-timeout's, say) is
    re-armed afterwards with the time it had left."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expire(signum, frame):
        raise TimeoutError(f"symbolic comparison took over {seconds} s")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, _expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


@functools.lru_cache(maxsize=1)
def _latex_parser():
    """``latex2sympy2_extended``'s parser, configured as close to sympy's ``parse_latex`` as it goes."""
    from latex2sympy2_extended import NormalizationConfig, latex2sympy

    # Closest to sympy's parse_latex, which lm-eval uses: only the package's basic clean-up
    # (\left( -> (, \dfrac -> \frac, ...), no unboxing or unit stripping of its own (Minerva's
    # rules did that already), and case-sensitive symbols (X is not x).
    options: dict = {}
    try:
        options["normalization_config"] = NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=False, nits=False, boxed="none",
            equations=False,
        )
        from latex2sympy2_extended.latex2sympy2 import ConversionConfig

        options["conversion_config"] = ConversionConfig(lowercase_symbols=False)
    except Exception:  # noqa: BLE001 - an older release: its defaults
        log.debug("latex2sympy2_extended without these options; using %s", options or "its defaults")
    return functools.partial(latex2sympy, **options)


# \\frac's operands and \\log's base are one DIGIT token or a braced group in parse_latex's grammar
# (\\frac32 is 3/2, \\frac{270}7 is 270/7; \\frac{3}\\pi and \\frac{1}x it cannot read); latex2sympy2_extended
# reads only braced ones, so a bare digit is braced (MATH's gold answers use the form). A numerator
# keeps braces of its own one level deep (\\frac{2\\sqrt{3}}3).
_BARE_NUMERATOR = re.compile(r"(\\[dt]?frac)([0-9])")
_BARE_DENOMINATOR = re.compile(r"(\\[dt]?frac\{(?:[^{}]|\{[^{}]*\})*\})([0-9])")
# \\log_28: the subscript reads digits greedily but leaves the last one as the argument when
# nothing else follows (log₂ 8; \\log_28x is log₂₈ x).
_LOG_BASE = re.compile(r"\\log_([0-9]+)")
_NO_ARGUMENT = (")", "]", "}", ",", "\\}")
# Commands parse_latex reads as plain symbols (it makes any unknown \\name a Symbol; a\\pm b is
# a·b·pm) and latex2sympy2_extended as operators (\\pm: a set of two values, \\in: a relation);
# \\mathit{pm} is the same symbol in both.
_SYMBOL_COMMAND = re.compile(r"\\(pm|mp|in)(?![a-zA-Z])")
# parse_latex multiplies juxtaposed terms, a whole number before a fraction too: 1\\frac{4}{5} is 4/5
# there, 9/5 (a mixed number) in latex2sympy2_extended; the product made explicit.
_MIXED_NUMBER = re.compile(r"([0-9])(\\[dt]?frac)")
# What as_parse_latex_reads looks at, as parse_latex's lexer cuts it: numbers, brackets (\\{ \\} are
# tokens of their own), commas and dots (any other "." is a stray one), and characters the lexer has
# no token for. Closer -> opener below.
_TOKEN = re.compile(r"[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?|\\[{}]|\\[$%&#]|[$%&#;@\"~?]|[{}()\[\],.]")
# \, \: \; \! \left \right: skipped by parse_latex's lexer (so 2\left(1,2\right) is 2(1,2)).
_SKIPPED = re.compile(r"\\(?:[,:;!]|left|right)(?![a-zA-Z])")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")  # 1,234.5 is one number there
_OPENER_OF = {"}": "{", ")": "(", "]": "[", "\\}": "\\{"}
# parse_latex drops operators left without an operand at the end of what it reads (x+ is x, 2\\cdot is 2).
_TRAILING_OPERATORS = re.compile(r"(?:[-+*/^]|\\cdot|\\times|\\div)+$")


class Unreadable(ValueError):
    """parse_latex raises on this string (so lm-eval scores the pair 0)."""


def _brace_log_base(match: re.Match) -> str:
    digits, rest = match.group(1), match.string[match.end():]
    if len(digits) > 1 and (not rest or rest.startswith(_NO_ARGUMENT)):
        return f"\\log_{{{digits[:-1]}}}{digits[-1]}"
    return f"\\log_{{{digits}}}"


def as_parse_latex_reads(latex: str) -> str:
    """The part of ``latex`` that sympy's ``parse_latex`` (lm-eval's parser) reads, rewritten so that
    latex2sympy2_extended reads it as parse_latex does; :class:`Unreadable` where parse_latex raises.

    parse_latex ends its expression where the next token cannot continue it and ignores the rest;
    latex2sympy2_extended asks for the whole string, so it gets that part. Such an end is
    * a closing bracket that no bracket opened (Minerva's split at "=" of ``\\boxed{x = 5}`` leaves
      ``5}``: 5 there);
    * a comma but for a number's thousands separator (``1,2`` is 1, so lm-eval counts it equal to
      ``1``; ``1,234.5`` is one number);
    * a "." after anything but a digit (``x.`` is x) or after a number's decimals (``1.2.3``; with
      two decimals or more the number ends one digit early: ``1.25.`` is 1.2);
    * a subscript of a number (``4210_5`` is 4210; latex2sympy2_extended: base 5).
    Inside a bracket such an end ends the expression before the outermost open bracket when an
    operand precedes it (``2(1,2)`` and ``x\\in[-2,7]`` are 2 and x·in; ``x(1,2)`` is a function call),
    else it is an error, as are a closing bracket of another kind than the open one (``(1\\}``), a "."
    that starts an operand (``.5``), a number's "." without digits after it (``5.``: a number is
    DIGIT+ ('.' DIGIT+)? there) and a character the lexer has no token for (``\\$5``). Operators left
    at the end are dropped (``x+`` is x). Also, ``\\{ \\}`` group as parentheses do
    (latex2sympy2_extended: a set), a whole number before a fraction multiplies it
    (``_MIXED_NUMBER``), and bare-digit operands of ``\\frac`` and ``\\log_`` are braced.
    """
    latex = _SKIPPED.sub("", latex)
    latex = _BARE_DENOMINATOR.sub(r"\1{\2}", _BARE_NUMERATOR.sub(r"\1{\2}", latex))
    latex = _SYMBOL_COMMAND.sub(r"\\mathit{\1}", _LOG_BASE.sub(_brace_log_base, latex))
    cut, stack = len(latex), []
    for found in _TOKEN.finditer(latex):
        token, at = found.group(), found.start()
        if token in _OPENER_OF.values():
            stack.append((token, at))
            continue
        if token in _OPENER_OF and stack:
            if stack.pop()[0] != _OPENER_OF[token]:
                raise Unreadable(f"{latex!r}: {token} closes {latex[:at]!r}")
            continue
        if token[0].isdigit():
            if latex.startswith(".", found.end()) and "." not in token:  # 5. : DIGIT+ '.' then no DIGIT
                raise Unreadable(f"{latex!r}: the number {token} ends in '.'")
            if not latex.startswith(("_", "."), found.end()):
                continue
            at = found.end()  # its subscript or a second '.'
            if latex.startswith(".", at) and len(token.rsplit(".", 1)[1]) > 1:
                at -= 1
        elif token == "." and at == 0:
            raise Unreadable(f"{latex!r}: starts with '.'")
        elif not (token in _OPENER_OF or token in ",."):
            raise Unreadable(f"{latex!r}: parse_latex's lexer has no token for {token!r}")
        if stack:  # parse_latex gives up the outermost bracket, if the operand before it can end
            opener, at = stack[0]
            before = _TRAILING_OPERATORS.sub("", latex[:at])
            if opener == "{" or not before or (opener == "(" and before == latex[:at] and before[-1].isalpha()):
                raise Unreadable(f"{latex!r}: {latex[found.start()]!r} inside {''.join(o for o, _ in stack)}")
        cut = at
        break
    latex = _TRAILING_OPERATORS.sub("", latex[:cut])
    latex = _THOUSANDS.sub("", latex).replace("\\{", "(").replace("\\}", ")")
    return _MIXED_NUMBER.sub(r"\1\\cdot\2", latex)


def symbolically_equal(a: str, b: str, timeout_s: int = SYMBOLIC_TIMEOUT_S) -> bool:
    """sympy simplifies parse(a) - parse(b) to 0 within ``timeout_s``; False on any failure
    (unparsable, not subtractable such as tuples or sets, timeout)."""
    latex_parser = _latex_parser()
    import sympy

    def parse(latex: str):
        return latex_parser(as_parse_latex_reads(latex))

    try:
        with _time_limit(timeout_s):
            return bool(sympy.simplify(parse(a) - parse(b)) == 0)
    except Exception as err:  # noqa: BLE001 - includes TimeoutError
        log.debug("no symbolic match for %r vs %r: %s", a, b, err)
        return False


def answers_match(predicted: str, gold: str) -> bool:
    """Normalised ``predicted`` equals normalised ``gold``, literally or symbolically."""
    if not predicted or predicted == INVALID_ANSWER:
        return False
    return predicted == gold or symbolically_equal(predicted, gold)


# ---------------------------------------------------------------------------------------------
# lm-eval task hooks
# ---------------------------------------------------------------------------------------------
def doc_to_text(doc: dict) -> str:
    return PROMPT.format(problem=doc["problem"])


def gold_answer(solution: str) -> str:
    boxed = last_boxed(solution)
    if boxed is None:
        log.warning("MATH solution without a \\boxed{} answer (it can never match): %.80r", solution)
        return ""
    return normalize_answer(boxed)


def process_doc(doc: dict) -> dict:
    out = {"problem": doc["problem"], "solution": doc["solution"], "answer": gold_answer(doc["solution"])}
    if doc.get("few_shot") is not None:
        out["few_shot"] = True
    return out


def process_docs(dataset):
    return dataset.map(process_doc)


def list_fewshot_samples() -> list[dict]:
    return [{"problem": p, "solution": s, "few_shot": "1"} for p, s in FEWSHOT_EXAMPLES]


# lm-eval 0.4.9's text of the same examples (the version behind d²Cache's Table 1), before 0.4.13 fixed
# three typos: a stray "}" after the first problem, and two LaTeX line breaks written as one backslash.
FEWSHOT_TYPOS_0_4_9: tuple[tuple[str, str], ...] = (
    ("{\\sqrt{5-x}}$.", "{\\sqrt{5-x}}$.}"),
    ("30n&=480\\\\\n", "30n&=480\\\n"),
    ("6x-4y&=a,\\\\\n", "6x-4y&=a,\\\n"),
)


def list_fewshot_samples_lm_eval_0_4_9() -> list[dict]:
    """The four examples as lm-eval 0.4.9 wrote them (each typo in exactly one example text)."""
    samples = list_fewshot_samples()
    for fixed, typo in FEWSHOT_TYPOS_0_4_9:
        (sample, key), = [(d, k) for d in samples for k in ("problem", "solution") if fixed in d[k]]
        sample[key] = sample[key].replace(fixed, typo)
    return samples


def math_verify_score(solution: str, candidate: str) -> int:
    """math-verify's verdict (1/0) on the raw solution and generation."""
    from math_verify import parse, verify

    try:
        return int(bool(verify(gold=parse(solution), target=parse(candidate))))
    except Exception as err:  # noqa: BLE001 - a parser failure scores 0
        log.debug("math_verify failed: %s", err)
        return 0


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    generation = results[0]
    answer = extract_final_answer(generation)
    matched = answer != INVALID_ANSWER and answers_match(normalize_answer(answer), doc["answer"])
    return {"exact_match": int(matched), "math_verify": math_verify_score(doc["solution"], generation)}
