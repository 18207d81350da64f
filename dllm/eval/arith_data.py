"""Synthetic GSM8K-style word problems over small numbers: the data of ``task=arith`` (test split)
and the training stream for tiny diffusion LMs (train split).

A problem is a short story with one to three additions / subtractions or a comparison, e.g.

    Question: Tom has 3 apples. He buys 4 more and gives 2 away. How many apples does Tom have now?
    Answer:   He buys 4 more: 3 + 4 = 7.
              He gives 2 away: 7 - 2 = 5.
              #### 5

with the answer in GSM8K's format (a worked solution, then ``#### <number>``), so lm-eval's
gsm8k filters and exact match score it unchanged. Everything is deterministic given a seed.

Train / test split by construction: a problem belongs to the test split iff the hash of its
question text falls in the test bucket (:func:`split_of`), so no held-out question can ever be
produced by the training stream, whatever the seeds.

    python -m dllm.eval.arith_data            # (re)writes dllm/eval/tasks/arith/data/arith_test.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NAMES = [
    ("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Lily", "She"), ("Sam", "He"), ("Mia", "She"),
    ("Jack", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"), ("Max", "He"), ("Ella", "She"),
    ("Noah", "He"), ("Ava", "She"), ("Luke", "He"), ("Ruby", "She"),
]
ITEMS = [
    "apples", "pencils", "marbles", "stickers", "cookies", "books",
    "cards", "balloons", "shells", "stamps", "toys", "coins",
]
# (verb phrase with {k}, sign)
OPS = [
    ("buys {k} more", +1), ("finds {k} more", +1), ("gets {k} more", +1),
    ("gives {k} away", -1), ("loses {k}", -1), ("sells {k}", -1),
]
KINDS = ("change", "compare", "together")

PROMPT_FORMAT = "Question: {question}\nAnswer:"  # the gsm8k task's doc_to_text
TEST_SEED = 20240601  # the committed held-out file
TEST_FRACTION = 0.1  # share of the problem space reserved for the test split
MAX_VALUE = 12  # every number in a problem, intermediate results included, lies in [0, MAX_VALUE]
DATA_DIR = Path(__file__).resolve().parent / "tasks" / "arith" / "data"
TEST_FILE = DATA_DIR / "arith_test.jsonl"


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # worked solution ending in "#### <number>"
    value: int
    kind: str

    def doc(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def split_of(question: str) -> str:
    """'test' for the hash bucket reserved for held-out problems, else 'train'."""
    h = int.from_bytes(hashlib.sha256(("arith|" + question).encode()).digest()[:8], "big")
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def _change(rng: random.Random, max_value: int, max_ops: int) -> Problem | None:
    name, he = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, max_value)
    n_ops = rng.randint(1, max_ops)
    start = value
    phrases, lines = [], []
    for _ in range(n_ops):
        verb, sign = rng.choice(OPS)
        k = rng.randint(1, 9)
        new = value + sign * k
        if new < 0 or new > max_value:
            return None
        phrase = verb.format(k=k)
        phrases.append(phrase)
        lines.append(f"{he} {phrase}: {value} {'+' if sign > 0 else '-'} {k} = {new}.")
        value = new
    if len(phrases) == 1:
        story = phrases[0]
    else:
        story = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    question = f"{name} has {start} {item}. {he} {story}. How many {item} does {name} have now?"
    return Problem(question, "\n".join(lines) + f"\n#### {value}", value, "change")


def _two_people(rng: random.Random) -> tuple[str, str]:
    (a, _), (b, _) = rng.sample(NAMES, 2)
    return a, b


def _compare(rng: random.Random, max_value: int) -> Problem | None:
    a_name, b_name = _two_people(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(1, max_value), rng.randint(1, max_value)
    if a == b or abs(a - b) > 9:  # the same one-digit differences as the other kinds
        return None
    if a > b:
        question = f"{a_name} has {a} {item}. {b_name} has {b} {item}. How many more {item} does {a_name} have than {b_name}?"
        lines = [f"{a_name} has {a} and {b_name} has {b}.", f"{a} - {b} = {a - b}."]
        value = a - b
    else:
        question = f"{a_name} has {a} {item}. {b_name} has {b} {item}. How many fewer {item} does {a_name} have than {b_name}?"
        lines = [f"{b_name} has {b} and {a_name} has {a}.", f"{b} - {a} = {b - a}."]
        value = b - a
    return Problem(question, "\n".join(lines) + f"\n#### {value}", value, "compare")


def _together(rng: random.Random, max_value: int) -> Problem | None:
    a_name, b_name = _two_people(rng)
    item = rng.choice(ITEMS)
    a, k = rng.randint(1, max_value), rng.randint(1, 9)
    more = rng.random() < 0.5
    b = a + k if more else a - k
    if b < 1 or b > max_value or a + b > max_value:
        return None
    rel = "more" if more else "fewer"
    question = (
        f"{a_name} has {a} {item}. {b_name} has {k} {rel} {item} than {a_name}. "
        f"How many {item} do they have together?"
    )
    lines = [f"{b_name} has {a} {'+' if more else '-'} {k} = {b}.", f"Together: {a} + {b} = {a + b}."]
    return Problem(question, "\n".join(lines) + f"\n#### {a + b}", a + b, "together")


def sample_problem(rng: random.Random, max_value: int = MAX_VALUE, max_ops: int = 3) -> Problem:
    """One random problem (any split); all numbers, intermediate ones included, in [0, max_value]."""
    while True:
        kind = rng.choices(KINDS, weights=(3, 1, 1))[0]
        if kind == "change":
            p = _change(rng, max_value, max_ops)
        elif kind == "compare":
            p = _compare(rng, max_value)
        else:
            p = _together(rng, max_value)
        if p is not None:
            return p


def stream(split: str, seed: int, **kwargs) -> Iterator[Problem]:
    """Endless problems of ``split`` ('train' | 'test'), deterministic given the seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} (allowed: train, test)")
    rng = random.Random(f"arith-{split}-{seed}")
    while True:
        p = sample_problem(rng, **kwargs)
        if split_of(p.question) == split:
            yield p


def make_split(split: str, n: int, seed: int, **kwargs) -> list[Problem]:
    """``n`` distinct problems of ``split``, in generation order."""
    seen: set[str] = set()
    out: list[Problem] = []
    for p in stream(split, seed, **kwargs):
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def prompt_text(question: str) -> str:
    return PROMPT_FORMAT.format(question=question)


def load_test(path: Path = TEST_FILE) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# GSM8K's two extractions (lm-eval's gsm8k filters): strict "#### n", flexible = last number.
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _clean(s: str) -> str:
    return s.replace(",", "").replace("$", "").rstrip(".")


def extract_strict(text: str) -> str | None:
    m = STRICT.search(text)
    return _clean(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    found = FLEXIBLE.findall(text)
    if not found:
        return None
    last = found[-1]
    return _clean(last[0] or last[1])


def target_of(answer: str) -> str:
    return _clean(answer.split("#### ")[-1].strip())


def is_correct(generation: str, answer: str, strict: bool = False) -> bool:
    got = extract_strict(generation) if strict else extract_flexible(generation)
    return got is not None and got == target_of(answer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the held-out arith test file")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=TEST_SEED)
    parser.add_argument("--out", type=Path, default=TEST_FILE)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    docs = [p.doc() for p in make_split("test", args.n, args.seed)]
    args.out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"wrote {len(docs)} problems to {args.out}")


if __name__ == "__main__":
    main()
