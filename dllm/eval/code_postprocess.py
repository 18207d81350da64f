"""Code-task answers of instruct models, scored the way the papers' evaluation code scores them.

An instruct model answers a HumanEval prompt in a chat turn: prose, then a fenced ```python block
holding the whole function (often restating the signature, sometimes with example calls or
prints). lm-eval's HumanEval scores ``prompt + answer``, which is not a program then (0/164 for
the canonical solutions written that way). The d²Cache and Fast-dLLM evaluation code instead:

1. take the code of the first ```python fence (the text after it, up to the next ```; the whole
   answer if there is no such fence) — :func:`extract_code`;
2. HumanEval: prepend the prompt (a newline between), so that a body-only answer completes the
   prompt's function and a full-function answer redefines it;
3. sanitize (:func:`sanitize`): keep the longest stretch of lines that parses, then only the
   imports and the top-level definitions reachable from the entry point (functions that return
   something, classes, simple assignments), dropping test code, prints and ``__main__`` blocks.
   Reachable as the reference computes it (its ``get_deps``, the ``ast`` port of evalplus's
   sanitizer in d²Cache's, Fast-dLLM's and Dream's code; evalplus's own tree-sitter version differs):
   a definition uses the names it reads and the attribute names it reads, but not what an attribute
   is read from, so a module-level object used only through an attribute (``WORD.findall(s)`` with
   ``WORD = re.compile(...)``) is dropped and the program fails with a NameError, as in the papers' scoring;
4. HumanEval: run the prompt followed by the sanitized code (as d²Cache's evaluation does: lm-eval's
   HumanEval filter prepends the prompt once more). The prompt's helper functions then stay
   defined for the tests even where the answer never calls them (HumanEval/50's tests call
   ``encode_shift``); Fast-dLLM's postprocess_code.py runs the sanitized code alone and scores
   that problem's canonical solution 0.

MBPP: step 1 only (d²Cache's code extracted the fenced code and ran it with the task's asserts).
This module follows those rules in our own code; it does not run anything. Where the reference
would crash the whole evaluation (code nested too deeply for Python's parser or for
``ast.unparse``: RecursionError, MemoryError), the answer is scored as a program without the
answer's code, i.e. it fails its tests.
"""
from __future__ import annotations

import ast

FENCE = "```"
PYTHON_FENCE = "```python\n"  # exactly, as the reference splits: "```python \n", "```python3\n" are no fence
MAX_LINES = 100  # the reference searches the first 100 lines for the longest parsable stretch


def extract_code(answer: str) -> str:
    """The code of the first ```python fence (up to the next ```), else the answer up to a ```."""
    start = answer.find(PYTHON_FENCE)
    code = answer[start + len(PYTHON_FENCE):] if start >= 0 else answer
    return code.split(FENCE, 1)[0]


def _normalise(text: str) -> str:
    return text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"


def longest_parsable(text: str) -> str:
    """The contiguous stretch of (at most the first 100) lines that parses with the most non-blank
    lines; the first such stretch on ties, "" if no stretch parses."""
    lines = _normalise(text).splitlines()[:MAX_LINES]  # as the reference: \f, \v, \u2028 ... end lines too
    best, best_count = "", 0
    for start in range(len(lines)):
        for stop in range(len(lines), start, -1):
            count = sum(1 for line in lines[start:stop] if line.strip())
            if count <= best_count:
                break  # shorter stretches from this start hold no more non-blank lines
            chunk = "\n".join(lines[start:stop])
            if not _parses(chunk):
                continue
            best, best_count = chunk, count
            break
    return best


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, RecursionError):  # the last two: nesting too deep to parse
        return False
    return True


def _returns(node: ast.AST) -> bool:
    return any(isinstance(inner, ast.Return) for inner in ast.walk(node))


def _names_used(node: ast.AST) -> set[str]:
    """The names ``node`` reads, as the papers' ``get_deps`` (an ``ast`` port of evalplus's) collects
    them: an attribute access contributes its attribute name only, and the expression it is read
    from is not searched."""
    used, todo = set(), [node]
    while todo:
        for child in ast.iter_child_nodes(todo.pop()):
            if isinstance(child, ast.Name):
                used.add(child.id)
            elif isinstance(child, ast.Attribute):
                used.add(child.attr)
            else:
                todo.append(child)
    return used


def sanitize(code: str, entry_point: str) -> str:
    """The imports, then the definitions reachable from ``entry_point`` in order of first
    definition (see the module doc).

    Kept definitions: classes, functions containing a ``return``, and assignments to a plain name
    (a later definition of a name replaces an earlier one). Everything else at top level is dropped.
    """
    tree = ast.parse(longest_parsable(code))
    imports, definitions = [], {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, ast.ClassDef) or (isinstance(node, ast.FunctionDef) and _returns(node)):
            definitions[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
    reachable, todo = set(), [entry_point]
    while todo:
        name = todo.pop()
        if name in reachable or name not in definitions:
            continue
        reachable.add(name)
        todo.extend(_names_used(definitions[name]) - reachable)
    kept = imports + [node for name, node in definitions.items() if name in reachable]
    try:
        return "\n".join(ast.unparse(node) for node in kept)
    except RecursionError:  # an expression nested too deeply to print back: no code (see module doc)
        return ""


def humaneval_program(doc: dict, answer: str, with_prompt: bool = True) -> str:
    """The program an instruct model's HumanEval answer is scored as (tests are appended later):
    the prompt, then the sanitized code (d²Cache's Table 1); ``with_prompt=False``: the sanitized
    code alone (Fast-dLLM's ``postprocess_code.py``, d²Cache's code since its commit 9a13d76)."""
    code = sanitize(doc["prompt"] + "\n" + extract_code(answer), doc["entry_point"])
    return doc["prompt"] + "\n" + code if with_prompt else code


def mbpp_program(answer: str) -> str:
    """The program an instruct model's MBPP answer is scored as: its fenced code."""
    return extract_code(answer)
