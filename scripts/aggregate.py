"""Results CSV -> one table per (model, task, setting): accuracy, throughput, speedup, latency.

    python scripts/aggregate.py results/runs.csv                      # prints the tables, writes nothing
    python scripts/aggregate.py results/runs.csv --out results/tables
    python scripts/aggregate.py results/runs.csv --published results/published.csv --experiment d2cache_table1

Prints the Markdown tables. Only with ``--out`` does it write files there: ``tables.md`` (Markdown),
``tables.tex`` (LaTeX, booktabs, one ``table`` per group) and ``summary.csv`` (every table row,
machine-readable); where runs recorded ``tokens_per_forward``, also the AUP tables ``aup.md``,
``aup.tex`` and ``aup.csv`` (printed after the tables; where none did, AUP files an earlier run
left there are removed). Every input is checked before anything is printed or written (a bad one:
one error line, exit 2; a number cell that is neither empty nor a finite number >= 0 included), and
each file is written whole (a temp file beside it, then renamed).

- Rows: status "ok" only; a run repeated with the same settings (same ``record_key``, e.g. after
  ``force=true``) counts once, the latest.
- A table is one (model, task, n_shot, gen_length, limit, batch_size, seed, hardware, dtype,
  threads, processes): numbers of different settings or machines are never mixed (the last
  three are empty in CSVs written before they were recorded). Each method is one row, labelled like the
  papers (``dkv_decode R=8``, ``dkv_greedy R=2 w=4``...), with more detail only where two rows of
  a table would otherwise share a label (cache / decoding parameters, then the checkpoint, lm-eval
  task or code scoring, then the run's start time).
- accuracy: the task's primary metric in % (± stderr). tok/s: useful tokens (up to the first EOS)
  per second of generation (± std over timing repeats where the run recorded them). speedup: the
  ``none`` row's generation time over this row's for the same samples (= ratio of all-token
  throughputs, so shorter answers do not count as speed; ± the two throughputs' relative stds
  combined); the baseline is the ``none`` row with the same decoding, else the one with
  low-confidence decoding, else any. latency: mean seconds per sample. ideal: 1 / recompute ratio.
- A speedup is marked ``(noisy)``, with the reason in a note under its table, where it exceeds the
  ideal bound by more than 2 % (caching cannot beat skipping the work, so the timing is off) or
  the throughput of its run or of its baseline varied by more than 10 % over the timing repeats.
- ``--published``: the papers' numbers for the same model, task, method and shot count beside ours
  (and the same generation length, decoding and lm-eval filter where the paper's setting names
  them; a paper experiment's run is shown beside its own table's row first).
- AUP (accuracy under parallelism, d3LLM's leaderboard metric; see :func:`aup`): one table per
  (model, task, setting) as above, one row per cache configuration (cache + its parameters +
  checkpoint / lm-eval task / code scoring). A row's curve is every run of that cache in the table,
  whatever its decoding: the points (tokens per forward, accuracy %), one per tokens-per-forward
  value (the best accuracy there). y_max, the reference accuracy of the penalty, is the best
  accuracy of any run of the table that has a curve point. Runs without ``tokens_per_forward`` (older
  CSVs, log-likelihood tasks) or accuracy are not points.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from dllm.atomic import make_out_folder, write_atomic  # noqa: E402
from dllm.logging.record import record_key  # noqa: E402
from dllm.logging.sinks import csv_layout  # noqa: E402

TABLE_KEYS = ["model", "task", "n_shot", "gen_length", "limit", "batch_size", "seed", "hardware", "dtype", "threads",
              "processes"]
METHOD_ORDER = ["none", "dllm_cache", "prefix", "dual", "dkv_decode", "dkv_greedy", "d2cache"]
NUMERIC = [  # the table keys stay text (as written in the CSV): they only group and label
    "accuracy", "accuracy_stderr", "n_samples",
    "useful_tokens", "all_tokens", "gen_seconds", "throughput_useful_tok_s", "throughput_all_tok_s",
    "latency_s_mean", "latency_s_p50", "nfe", "tokens_per_forward", "recompute_ratio", "ideal_speedup",
    "throughput_useful_tok_s_std", "throughput_all_tok_s_std",  # absent in older CSVs; empty for one timing
]
# lm-eval's metrics here are fractions (exact match, pass@1, accuracy), and so are their stderrs.
FRACTIONS = ["accuracy", "accuracy_stderr"]
# Where rows of one table still share a label after their cache / decoding parameters: what else
# can tell two runs of one method apart (checkpoint of the same preset, scoring rule...).
IDENTITY_COLUMNS = ["checkpoint", "lm_eval_task", "code_scoring", "chat", "cut_at_eos", "cut_at_until"]
FLAG_COLUMNS = ("chat", "cut_at_eos", "cut_at_until")  # yes/no columns, labelled with their name: "chat=False"
IDEAL_TOLERANCE = 0.02  # a speedup this far above 1 / recompute ratio is timing noise, not caching
NOISY_RELATIVE_STD = 0.10  # a throughput spread above this over the timing repeats is not a clean number
# Our model / task names -> the names in results/published.csv.
PUBLISHED_MODEL = {
    "llada": "llada-8b-instruct", "llada_base": "llada-8b-base", "llada_1_5": "llada-1.5",
    "dream": "dream-v0-instruct-7b", "dream_base": "dream-v0-base-7b",
}
PUBLISHED_TASK = {"math": "math500", "gsm8k": "gsm8k", "humaneval": "humaneval", "mbpp": "mbpp", "mmlu": "mmlu"}
# ... except where the lm-eval task that ran names another benchmark than its preset's default:
# task=math runs MATH-500 unless task.lm_eval_task selects the full 5000-problem test set ("math").
PUBLISHED_LM_EVAL_TASK = {
    "dllm_minerva_math": "math", "minerva_math": "math", "dllm_math500": "math500", "minerva_math500": "math500",
}
# A published row's setting names the decoding where one table has rows of several ("threshold
# 0.9": Fast-dLLM's confidence-threshold parallel decoding; "entropy": Dream's own decoding) ...
PUBLISHED_DECODING = {
    "random-remasking": "random", "low-confidence": "low_confidence", "threshold": "threshold", "entropy": "dream",
}
# ... and the lm-eval filter where it gives both (GSM8K's flexible-extract and strict-match).
PUBLISHED_FILTERS = ("flexible-extract", "strict-match")
# The published table each paper experiment reproduces (published.csv's source): a run of the
# experiment is shown beside its own table's row first, where other papers have one for the same setting.
PUBLISHED_SOURCE = {
    "d2cache_table1": "d2cache_v1_table1", "dkv_table1": "dkv_table1", "dkv_table2": "dkv_table2",
    "elastic_table1": "elastic_webpage", "sparse_dllm_table1": "sparse_dllm_table1",
    "streaming_table2": "streaming_table2", "dpad_main": "dpad_readme",
}
# Fast-dLLM's caches as the papers name them, by (cache, decoding) first, then by cache alone: the
# prefix cache with confidence-threshold decoding is "Fast-dLLM (parallel)", with one token per step
# "Prefix-Cache" (Streaming-dLLM's Table 2 has both).
PAPER_CACHE = {
    ("prefix", "threshold"): "fast_dllm_parallel",
    "prefix": "fast_dllm_prefix", "dual": "fast_dllm_dual",
}
COLUMNS = ["method", "accuracy", "tok/s", "speedup", "latency (s)", "ideal", "n"]
PAPER_COLUMNS = ["paper acc", "paper tok/s", "paper speedup"]


# ----------------------------------------------------------------------------------------------- loading
def _clean(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV as text cells; ValueError with a one-line reason where it cannot be read as one."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except OSError as err:  # missing, a directory, unreadable
        raise ValueError(f"{path}: cannot read it ({err.strerror})") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a CSV ({str(err).splitlines()[0]})") from None


def check_numbers(path: str | Path, rows: pd.DataFrame, columns: Iterable[str], upper: float = math.inf,
                  fits: Callable[[pd.Series], pd.Series] | None = None, allowed: str = "") -> None:
    """ValueError naming the first cell of ``columns`` (those present) that is neither empty nor a
    finite number >= 0 (and <= ``upper``, when given; or, with ``fits``, a number for which it is
    True, ``allowed`` saying which): run.py writes a value it does not know as an empty cell and none
    of these can be negative, so anything else is a damaged or hand-edited file, which would
    otherwise be shown as "–", label a table with it or break a figure."""
    if fits is None:
        def fits(values: pd.Series) -> pd.Series:
            return (values >= 0) & (values <= upper) & (values < math.inf)

        allowed = "a finite number >= 0" if upper == math.inf else f"a number from 0 to {upper:g}"
    for column in [c for c in columns if c in rows]:
        values = pd.to_numeric(rows[column], errors="coerce")
        bad = (rows[column] != "") & ~fits(values)
        if bad.any():
            index = bad.idxmax()  # the first bad row: the index counts the CSV's rows
            row = rows.loc[index]
            who = ", ".join(f"{c}={row[c]}" for c in ("source", "model", "method", "cache", "decoding", "started_at")
                            if c in rows and row[c])
            raise ValueError(f"{path}: row {index + 1} ({who}): {column}={row[column]!r} (allowed: {allowed}, or an empty cell)")


def check_table_keys(path: str | Path, rows: pd.DataFrame) -> None:
    """The numeric table keys hold what run.py writes there (they stay text: they group and label)."""
    def whole(values: pd.Series, least: int) -> pd.Series:
        return (values >= least) & (values % 1 == 0) & (values < math.inf)

    check_numbers(path, rows, ["n_shot", "seed"], fits=lambda v: whole(v, 0), allowed="an integer >= 0")
    check_numbers(path, rows, ["gen_length", "batch_size", "threads", "processes"], fits=lambda v: whole(v, 1),
                  allowed="an integer >= 1")
    check_numbers(path, rows, ["limit"], fits=lambda v: whole(v, 1) | ((v > 0) & (v < 1)),
                  allowed="an integer >= 1 or a fraction in (0, 1), as task.limit")


def load_runs(path: str | Path, experiment: str | None = None) -> pd.DataFrame:
    """The ok rows of a results CSV, one per run key (latest wins), typed, with a ``hardware`` column."""
    raw = read_csv(path)
    header, where = csv_layout(Path(path))
    if twice := sorted({name for name in header if header.count(name) > 1}):  # pandas would rename one "name.1"
        raise ValueError(f"{path}: its header names {twice} twice; not a CSV run.py wrote")
    if where:
        raise ValueError(f"{path}: unreadable from {where} (a row cut short by a crash?); fix: python "
                         f"scripts/repair_csv.py {path}")
    if raw.empty:
        raise ValueError(f"{path}: no rows")
    missing = {"model", "task", "cache", "decoding", "status", "started_at"} - set(raw.columns)
    if missing:
        raise ValueError(f"{path} is not a results CSV (missing columns {sorted(missing)})")
    statuses = sorted(set(raw["status"]))
    raw = raw[raw["status"] == "ok"].copy()
    if raw.empty:
        raise ValueError(f"{path}: no ok rows (statuses there: {statuses})")
    if experiment is not None:
        if "experiment" not in raw:
            raise ValueError(f"--experiment {experiment!r}: {path} has no experiment column")
        known = sorted(set(raw["experiment"]) - {""})
        raw = raw[raw["experiment"] == experiment]
        if raw.empty:
            raise ValueError(f"--experiment {experiment!r}: no ok row of it in {path} (experiments there: {known})")
    check_numbers(path, raw, NUMERIC)
    check_numbers(path, raw, FRACTIONS, upper=1)
    check_table_keys(path, raw)
    raw["key"] = [record_key(r) for r in raw.to_dict("records")]
    raw = raw.sort_values("started_at").drop_duplicates("key", keep="last")
    runs = raw.copy()
    for column in NUMERIC:
        if column in runs:
            runs[column] = pd.to_numeric(runs[column])  # empty cells: NaN (check_numbers refused the rest)
    gpu = runs["gpu_name"] if "gpu_name" in runs else pd.Series("", index=runs.index)
    runs["hardware"] = [g if g else d for g, d in zip(gpu, runs.get("device", pd.Series("", index=runs.index)))]
    for column in TABLE_KEYS:
        runs[column] = runs[column].fillna("").astype(str) if column in runs else ""
    return runs.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- labels
def _param(row: dict, name: str) -> str:
    value = _clean(row.get(name, ""))
    return value[:-2] if value.endswith(".0") else value


def paper_method(row: dict) -> str:
    """The method as the papers' tables name it (results/published.csv's ``method`` column)."""
    cache = row["cache"]
    named = PAPER_CACHE.get((cache, row.get("decoding")), PAPER_CACHE.get(cache))
    if named is not None:
        return named
    if cache == "dkv_decode":
        variant, r = _param(row, "cache.variant") or "decode", _param(row, "cache.refresh_interval")
        return {"decode": f"dkv_decode R={r}", "prefill": "dkv_prefill", "pd": f"dkv_pd R={r}"}.get(variant, f"dkv_{variant}")
    if cache == "dkv_greedy":
        r, w = _param(row, "cache.refresh_interval"), _param(row, "cache.window")
        return f"dkv_greedy R={r}" + (f" w={w}" if w not in ("", "0") else "")
    return cache


def display_method(row: dict) -> str:
    label = paper_method(row)
    return {"fast_dllm_prefix": "prefix", "fast_dllm_parallel": "prefix", "fast_dllm_dual": "dual"}.get(label, label)


def published_task(task: str, lm_eval_task: str = "") -> str | None:
    """The task as results/published.csv names it: by the lm-eval task that ran where that names
    the benchmark (task=math with the full MATH test set), else by the task preset."""
    return PUBLISHED_LM_EVAL_TASK.get(_clean(lm_eval_task)) or PUBLISHED_TASK.get(str(task))


def published_decoding(setting: str) -> str | None:
    """The decoding a published row's setting names (None: the table has only one per method)."""
    return next((d for hint, d in PUBLISHED_DECODING.items() if hint in setting), None)


def _detail(row: dict, columns: list[str]) -> str:
    parts = []
    for c in columns:
        value = _param(row, c)
        if value:
            # a parameter or a yes/no setting by its name; the identity columns' values name themselves
            parts.append(f"{c.split('.', 1)[-1]}={value}" if "." in c or c in FLAG_COLUMNS else value)
    return ", ".join(parts)


def method_labels(table: pd.DataFrame) -> list[str]:
    """One label per row: the paper-style name, plus, only among rows that still share a label,
    what differs between them: the decoding, then cache / decoding parameters, then the run's
    identity (checkpoint, lm-eval task, code scoring), then its start time. The last one keeps
    apart rows nothing else does (e.g. the same run written before and after ``run_key`` existed:
    two resume keys), rather than merging them."""
    rows = table.to_dict("records")
    names = [display_method(r) for r in rows]
    extras: list[list[str]] = [[] for _ in rows]
    params = [c for c in table.columns if c.startswith(("cache.", "decoding."))]
    for columns in (["decoding"], params, IDENTITY_COLUMNS, ["started_at"]):
        labels = [_label(n, e) for n, e in zip(names, extras)]
        for label in set(labels):
            same = [i for i, l in enumerate(labels) if l == label]
            differing = [c for c in columns if len({_clean(rows[i].get(c)) for i in same}) > 1]
            for i in same:
                detail = _detail(rows[i], differing)
                if detail:
                    extras[i].append(detail)
    return [_label(n, e) for n, e in zip(names, extras)]


def _label(name: str, extras: list[str]) -> str:
    return f"{name} ({'; '.join(extras)})" if extras else name


def _order(row: dict) -> tuple:
    cache = row["cache"]
    rank = METHOD_ORDER.index(cache) if cache in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, cache, 0 if row["decoding"] == "low_confidence" else 1, row["label"])


# ----------------------------------------------------------------------------------------------- tables
def baseline_of(row: dict, nones: list[dict]) -> dict | None:
    """The ``none`` row a method is compared with (same decoding, else low-confidence, else any)."""
    if not nones:
        return None
    for rule in (
        lambda n: n["decoding"] == row["decoding"] and _decoding_params(n) == _decoding_params(row),
        lambda n: n["decoding"] == row["decoding"],
        lambda n: n["decoding"] == "low_confidence",
        lambda n: True,
    ):
        hits = [n for n in nones if rule(n)]
        if hits:
            return hits[0]
    return None


def _decoding_params(row: dict) -> dict:
    return {k: _clean(v) for k, v in row.items() if k.startswith("decoding.") and _clean(v)}


def setting_text(key: dict) -> str:
    """E.g. "4-shot L=256 cpu float32 2 threads" (+ "limit N", "batch B", "P processes" where
    set), like published.csv's setting."""
    parts = [f"{key['n_shot']}-shot" if key["n_shot"] else "", f"L={key['gen_length']}"]
    if key["limit"]:
        parts.append(f"limit {key['limit']}")
    if key["batch_size"] not in ("", "1"):
        parts.append(f"batch {key['batch_size']}")
    parts += [key["hardware"], key["dtype"]]
    if key["threads"] and key["hardware"].startswith("cpu"):  # on a GPU they only feed it
        parts.append(f"{key['threads']} thread{'s' if key['threads'] != '1' else ''}")
    if key["processes"] not in ("", "1"):
        parts.append(f"{key['processes']} processes")
    return " ".join(p for p in parts if p)


def build_tables(runs: pd.DataFrame, published: pd.DataFrame | None = None) -> list[tuple[dict, pd.DataFrame]]:
    """[(table key, table)]: one table per TABLE_KEYS group, one row per method."""
    tables = []
    groups = sorted(runs.groupby(TABLE_KEYS, sort=False), key=lambda item: [_natural(v) for v in item[0]])
    for values, group in groups:
        key = dict(zip(TABLE_KEYS, values))
        group = group.copy()
        group["label"] = method_labels(group)
        rows = sorted(group.to_dict("records"), key=_order)
        nones = [r for r in rows if r["cache"] == "none"]
        out = []
        for r in rows:
            base = baseline_of(r, nones)
            speedup, speedup_std, noisy = _speedup(r, base)
            entry = {
                "method": r["label"],
                "accuracy": _pct(r.get("accuracy")),
                "accuracy_stderr": _pct(r.get("accuracy_stderr")),
                "tok/s": _num(r.get("throughput_useful_tok_s")),
                "tok/s std": _num(r.get("throughput_useful_tok_s_std")),
                "speedup": speedup,
                "speedup std": speedup_std,
                "noisy": noisy,
                "latency (s)": _num(r.get("latency_s_mean")),
                "ideal": _num(r.get("ideal_speedup")),
                "n": _num(r.get("n_samples")),
                "cache": r["cache"],
                "decoding": r["decoding"],
                "paper_method": paper_method(r),
                "baseline": base["label"] if base is not None else None,
            }
            if published is not None:
                entry.update(published_for(key, r, published))
            out.append(entry)
        tables.append((key, pd.DataFrame(out)))
    return tables


def _relative_std(row: dict) -> float | None:
    """Std / mean of the run's all-token throughput over its timing repeats (None: one timing)."""
    std, mean = _num(row.get("throughput_all_tok_s_std")), _num(row.get("throughput_all_tok_s"))
    return std / mean if std is not None and mean else None


def _speedup(row: dict, base: dict | None) -> tuple[float | None, float | None, str]:
    """(speedup over the baseline, its std, why it is noisy or "")."""
    if base is None or not row.get("gen_seconds") or not base.get("gen_seconds"):
        return None, None, ""
    if base is row:  # the baseline itself: 1 by definition, whatever its timing spread
        return 1.0, None, ""
    throughput, base_throughput = _num(row.get("throughput_all_tok_s")), _num(base.get("throughput_all_tok_s"))
    if not throughput or not base_throughput:  # not recorded (an older or hand-made CSV), or 0
        return None, None, ""
    # Same samples, same gen_length: the ratio of generation times. With stop_at_eos each run counts the
    # positions it generated, so stopping sooner is not counted as speed.
    speedup = throughput / base_throughput
    spreads = {"throughput": _relative_std(row), "baseline throughput": _relative_std(base)}
    known = [s for s in spreads.values() if s is not None]
    # Independent timings: the relative stds of a ratio add in quadrature.
    std = speedup * math.sqrt(sum(s * s for s in known)) if known else None
    reasons = []
    ideal = _num(row.get("ideal_speedup"))
    if ideal is not None and speedup > ideal * (1 + IDEAL_TOLERANCE):
        reasons.append(f"above its ideal {ideal:.2f}×")
    reasons += [f"{name} ± {s:.1%}" for name, s in spreads.items() if s is not None and s > NOISY_RELATIVE_STD]
    return speedup, std, "; ".join(reasons)


def _natural(text: str) -> tuple:
    """Sort key: numbers by value (L=64 before L=256), then text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _pct(value) -> float | None:
    return None if value is None or pd.isna(value) else 100.0 * float(value)


def _num(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


# ----------------------------------------------------------------------------------------------- AUP
# d3LLM's constants (get_aup's defaults, used for its leaderboard): the penalty factor and how many
# accuracy points below a curve's first point still count.
AUP_ALPHA = 3.0
AUP_MAX_DROP = 5.0
# 0.57 * 100 = 56.99999999999999: float noise of the fraction -> % conversion must not decide
# whether a point lies within AUP_MAX_DROP.
_AUP_EPS = 1e-9
AUP_SOURCE = (
    "d3LLM (Qian et al., arXiv:2601.07568, ICML 2026), "
    "github.com/hao-ai-lab/d3LLM AUP_leaderboard/aup_utils.py @ e5bfcac"
)


def aup_weight(y: float, y_max: float, alpha: float = AUP_ALPHA) -> float:
    """d3LLM's quality weight W(y) = min(exp(-alpha * (1 - y / y_max)), 1): 1 at the reference
    accuracy, e^-alpha at accuracy 0."""
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup_points(points: Iterable[tuple[float, float]], max_drop: float = AUP_MAX_DROP) -> list[tuple[float, float]]:
    """The points AUP integrates, sorted by tokens per forward: one per TPF value (the best accuracy
    there: d3LLM's curves never repeat a TPF, and its result would then depend on input order),
    without those more than ``max_drop`` points below the first (lowest-TPF) point's accuracy.

    ValueError for no point, a TPF that is not positive, an accuracy outside 0..100 (it is in %),
    or a curve whose highest-TPF point lies more than ``max_drop`` below its first (d3LLM's get_aup
    asserts this: such a curve has no AUP)."""
    best: dict[float, float] = {}
    for rho, y in points:
        rho, y = float(rho), float(y)
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"tokens per forward must be a positive number, got {rho}")
        if not (math.isfinite(y) and 0.0 <= y <= 100.0):
            raise ValueError(f"accuracy must be in % (0..100), got {y}")
        best[rho] = max(y, best.get(rho, y))
    if not best:
        raise ValueError("AUP needs at least one (tokens per forward, accuracy) point")
    curve = sorted(best.items())
    (rho_1, y_1), (rho_n, y_n) = curve[0], curve[-1]
    if y_1 - y_n > max_drop + _AUP_EPS:
        raise ValueError(
            f"accuracy at TPF {rho_n:.2f} is {y_n:.1f} %, {y_1 - y_n:.1f} points below its first "
            f"({y_1:.1f} % at TPF {rho_1:.2f}); AUP allows at most {max_drop:g}"
        )
    return [(rho, y) for rho, y in curve if y >= y_1 - max_drop - _AUP_EPS]


def aup(points: Iterable[tuple[float, float]], y_max: float, alpha: float = AUP_ALPHA,
        max_drop: float = AUP_MAX_DROP) -> float:
    """Accuracy under parallelism (AUP) of one curve of (tokens per forward, accuracy %) points.

    Definition (d3LLM: Qian et al., "d3LLM: Ultra-Fast Diffusion LLM using Pseudo-Trajectory
    Distillation", arXiv:2601.07568, ICML 2026; reference code github.com/hao-ai-lab/d3LLM,
    ``AUP_leaderboard/aup_utils.py`` ``get_aup`` at commit e5bfcac, which its leaderboard uses):
    with the points sorted by parallelism rho (tokens per forward, TPF), rho_1 < ... < rho_n, and
    accuracies y_i in % (0..100), keep those with y_i >= y_1 - 5 (the last must be, else AUP is
    undefined: ValueError), then

        AUP = rho_1 * y_1 + sum_{i=2..n} (rho_i - rho_{i-1}) * (y_i W(y_i) + y_{i-1} W(y_{i-1})) / 2
        W(y) = min(exp(-alpha * (1 - y / y_max)), 1),  alpha = 3

    i.e. the rectangle up to the first point at its own accuracy, then the trapezoid-rule area under
    the accuracy curve weighted by W, which penalises each accuracy point below y_max exponentially.
    y_max is the reference accuracy: d3LLM's leaderboard takes the highest accuracy of any method on
    the task (the autoregressive model's included). A one-point curve has AUP = rho_1 * y_1; a curve
    that keeps y_max up to rho_n has AUP = rho_n * y_max. Where two points share a TPF only the
    better counts (see :func:`aup_points`).

    d3LLM's own numbers (``AUP_leaderboard/data_llada.yaml``, GSM8K-CoT, y_max = 74.98):
    d3LLM-LLaDA [(1.0, 74.02), (9.11, 73.09)] -> 637.65; Fast-dLLM-LLaDA [(1.0, 74.79), (2.77, 74.68)] -> 205.78.
    """
    if not (math.isfinite(y_max) and 0.0 < y_max <= 100.0):
        raise ValueError(f"y_max must be an accuracy in % above 0 (0..100], got {y_max}")
    curve = aup_points(points, max_drop)
    total = curve[0][0] * curve[0][1]  # the first point's rectangle is not weighted (as in get_aup)
    for (rho_prev, y_prev), (rho, y) in zip(curve, curve[1:]):
        total += 0.5 * (rho - rho_prev) * (y * aup_weight(y, y_max, alpha) + y_prev * aup_weight(y_prev, y_max, alpha))
    return total


def _aup_point(row: dict) -> tuple[float, float] | None:
    """(TPF, accuracy in %) of a run; None where either is unknown (older CSVs, log-likelihood
    tasks) or the TPF is not positive. The CSV's accuracy is a fraction, AUP's is in %."""
    tpf, accuracy = _num(row.get("tokens_per_forward")), _pct(row.get("accuracy"))
    if tpf is None or accuracy is None or not math.isfinite(tpf) or tpf <= 0:
        return None
    return tpf, accuracy


def _curve_key(row: dict) -> tuple:
    """What makes runs one curve: the same cache with the same parameters, on the same checkpoint,
    lm-eval task and code scoring (the decoding and its parameters are what moves along it)."""
    # _param: "50" and "50.0" (CSV rows of different writers) are the same setting.
    params = tuple(sorted((c, _param(row, c)) for c in row if c.startswith("cache.") and _param(row, c)))
    return row["cache"], params, tuple(_clean(row.get(c)) for c in IDENTITY_COLUMNS)


def build_aup_tables(runs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """[(table key, AUP table)]: one per TABLE_KEYS group that has a curve point, one row per cache
    configuration (its curve: every run of it in the group). y_max: the best accuracy of a point of
    the group."""
    tables = []
    groups = sorted(runs.groupby(TABLE_KEYS, sort=False), key=lambda item: [_natural(v) for v in item[0]])
    for values, group in groups:
        rows = [r for r in group.to_dict("records") if _aup_point(r) is not None]
        if not rows:
            continue
        curves: dict[tuple, list[dict]] = {}
        for r in rows:
            curves.setdefault(_curve_key(r), []).append(r)
        # Labels as the main tables', from one run per curve with its decoding left out (it varies along the curve).
        reps = pd.DataFrame([{k: v for k, v in rs[0].items() if not k.startswith("decoding") and k != "started_at"}
                             for rs in curves.values()])
        labels = method_labels(reps)
        best = max(rows, key=lambda r: _aup_point(r)[1])
        y_max = _aup_point(best)[1]
        best_label = labels[list(curves).index(_curve_key(best))]
        out = []
        for label, rs in zip(labels, curves.values()):
            points = [_aup_point(r) for r in rs]
            try:
                used, value, why = aup_points(points), aup(points, y_max), ""
            except ValueError as err:
                used, value, why = [], None, str(err)
            left_out = sorted({p for p in points if p[0] not in {u[0] for u in used}}) if used else []
            out.append({
                "method": label, "AUP": value, "runs": len(rs), "points": len(used),
                "TPF first": used[0][0] if used else None, "TPF last": used[-1][0] if used else None,
                "accuracy first": used[0][1] if used else None, "accuracy last": used[-1][1] if used else None,
                "y_max": y_max, "y_max run": f"{best_label}, {best['decoding']}",
                "left out": "; ".join(f"TPF {r:.2f} ({y:.1f} %)" for r, y in left_out), "why": why,
                "cache": rs[0]["cache"],
            })
        rank = lambda e: (METHOD_ORDER.index(e["cache"]) if e["cache"] in METHOD_ORDER else len(METHOD_ORDER), e["cache"], e["method"])  # noqa: E731
        tables.append((dict(zip(TABLE_KEYS, values)), pd.DataFrame(sorted(out, key=rank))))
    return tables


def _span(first, last, spec: str) -> str:
    """The curve's "first–last" value, one number where they agree."""
    if first is None or pd.isna(first):
        return "–"
    return _fmt(first, spec) if _fmt(first, spec) == _fmt(last, spec) else f"{_fmt(first, spec)}–{_fmt(last, spec)}"


def aup_display_frame(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "method": table["method"],
        "AUP": [_fmt(v, ".1f") for v in table["AUP"]],
        "runs": [str(v) for v in table["runs"]],
        "points": [str(v) for v in table["points"]],
        "TPF": [_span(a, b, ".2f") for a, b in zip(table["TPF first"], table["TPF last"])],
        "accuracy": [_span(a, b, ".1f") for a, b in zip(table["accuracy first"], table["accuracy last"])],
    })


def aup_note(table: pd.DataFrame) -> str:
    """The line under an AUP table: its y_max, the points left out, the curves without AUP."""
    first = table.iloc[0]
    parts = [f"y_max = {first['y_max']:.1f} % ({first['y_max run']})"]
    parts += [f"{m}: left out {lo}" for m, lo in zip(table["method"], table["left out"]) if lo]
    parts += [f"{m}: no AUP, {why}" for m, why in zip(table["method"], table["why"]) if why]
    return "; ".join(parts) + "."


AUP_NOTES = (
    f"AUP: accuracy under parallelism, {AUP_SOURCE}. Per cache configuration, its runs (any decoding) "
    "as points (TPF = tokens per forward, accuracy %), the best accuracy per TPF, sorted by TPF; "
    f"points more than {AUP_MAX_DROP:g} below the first are left out (the last may not be). "
    "AUP = TPF_1·acc_1 + Σ ΔTPF·(acc_i·W(acc_i) + acc_{i-1}·W(acc_{i-1}))/2, "
    f"W(acc) = min(exp(-{AUP_ALPHA:g}·(1 - acc/y_max)), 1); y_max: the table's best run. "
    "runs: runs of the curve; points: points integrated; TPF, accuracy: at the first and last of them."
)


def render_aup(tables: list[tuple[dict, pd.DataFrame]]) -> tuple[str, str, pd.DataFrame]:
    """(Markdown, LaTeX, rows) of the AUP tables."""
    md, tex, rows = [AUP_NOTES + "\n"], ["% " + AUP_NOTES + "\n% needs \\usepackage{booktabs}\n"], []
    for key, table in tables:
        frame, note, title = aup_display_frame(table), aup_note(table), "AUP · " + title_of(key)
        md.append(f"### {title}\n\n{to_markdown(frame)}\n\n{note}\n")
        label = "tab:aup-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{key['model']}-{key['task']}-{key['n_shot']}-{key['gen_length']}").strip("-")
        tex.append(to_latex(frame, title, label, note))
        rows.append(table.drop(columns=["cache"]).assign(**{k: key[k] for k in TABLE_KEYS}))
    frame = pd.concat(rows, ignore_index=True)
    return "\n".join(md), "\n".join(tex), frame[TABLE_KEYS + [c for c in frame.columns if c not in TABLE_KEYS]]


# ----------------------------------------------------------------------------------------------- published
def load_published(path: str | Path) -> pd.DataFrame:
    published = read_csv(path)
    need = {"source", "model", "task", "setting", "method", "throughput_tok_s", "speedup", "score"}
    if need - set(published.columns):
        raise ValueError(f"{path} lacks columns {sorted(need - set(published.columns))}")
    check_numbers(path, published, ["throughput_tok_s", "speedup", "score"])
    return published


def published_for(key: dict, row: dict, published: pd.DataFrame) -> dict:
    """The papers' score / throughput / speedup for this model, task, method and shot count (and
    generation length, decoding and lm-eval filter where the published setting names them); of the
    run's experiment's own table where it has one, else of the first paper that does."""
    empty = {"paper acc": None, "paper tok/s": None, "paper speedup": None, "paper source": None}
    model, task = PUBLISHED_MODEL.get(str(key["model"])), published_task(key["task"], row.get("lm_eval_task"))
    if model is None or task is None:
        return empty
    hits = published[(published["model"] == model) & (published["task"] == task) & (published["method"] == paper_method(row))]
    metric_filter = _clean(row.get("accuracy_metric")).partition(",")[2]
    keep = []
    for p in hits.to_dict("records"):
        shots = re.search(r"(\d+)-shot", p["setting"])
        if shots and key["n_shot"] and shots.group(1) != key["n_shot"]:
            continue
        length = re.search(r"L=(\d+)", p["setting"])
        if length and length.group(1) != key["gen_length"]:
            continue
        decoding = published_decoding(p["setting"])
        if decoding is not None and decoding != row["decoding"]:
            continue
        named_filter = next((f for f in PUBLISHED_FILTERS if f in p["setting"]), None)
        if named_filter is not None and metric_filter in PUBLISHED_FILTERS and named_filter != metric_filter:
            continue
        keep.append(p)
    if not keep:
        return empty
    own = PUBLISHED_SOURCE.get(_clean(row.get("experiment")))
    p = next((p for p in keep if p["source"] == own), keep[0])
    return {
        "paper acc": pd.to_numeric(p["score"], errors="coerce"),
        "paper tok/s": pd.to_numeric(p["throughput_tok_s"], errors="coerce"),
        "paper speedup": pd.to_numeric(p["speedup"], errors="coerce"),
        "paper source": p["source"],
    }


# ----------------------------------------------------------------------------------------------- output
def _fmt(value, spec: str) -> str:
    return "–" if value is None or pd.isna(value) else format(value, spec)


def _spread(value, std, spec: str) -> str:
    """The value, followed by " ± std" where the std is known."""
    return _fmt(value, spec) + ("" if std is None or pd.isna(std) else f" ± {format(std, spec)}")


def _times(value, std=None) -> str:
    return "–" if value is None or pd.isna(value) else _spread(value, std, ".2f") + "×"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text cells (accuracy with stderr, tok/s and speedup with their spread where
    recorded, noisy speedups marked)."""
    out = pd.DataFrame({
        "method": table["method"],
        "accuracy": [_spread(a, s, ".1f") for a, s in zip(table["accuracy"], table["accuracy_stderr"])],
        "tok/s": [_spread(v, s, ".1f") for v, s in zip(table["tok/s"], table["tok/s std"])],
        "speedup": [
            _times(v, s) + (" (noisy)" if noisy else "")
            for v, s, noisy in zip(table["speedup"], table["speedup std"], table["noisy"])
        ],
        "latency (s)": [_fmt(v, ".3g") for v in table["latency (s)"]],
        "ideal": [_times(v) for v in table["ideal"]],
        "n": [_fmt(v, ".0f") for v in table["n"]],
    })
    if "paper acc" in table:
        out["paper acc"] = [_fmt(v, ".1f") for v in table["paper acc"]]
        out["paper tok/s"] = [_fmt(v, ".2f") for v in table["paper tok/s"]]
        out["paper speedup"] = [_times(v) for v in table["paper speedup"]]
    return out


def noisy_note(table: pd.DataFrame) -> str:
    """The line under a table saying why each of its noisy speedups is one ("" if none is)."""
    reasons = [f"{method}: {why}" for method, why in zip(table["method"], table["noisy"]) if why]
    return "(noisy) speedup not a clean number — " + "; ".join(reasons) + "." if reasons else ""


def title_of(key: dict) -> str:
    return f"{key['model']} · {key['task']} · {setting_text(key)}"


def to_markdown(frame: pd.DataFrame) -> str:
    cells = [list(frame.columns)] + frame.astype(str).values.tolist()
    widths = [max(len(row[i]) for row in cells) for i in range(len(frame.columns))]
    right = [c != "method" for c in frame.columns]
    line = lambda row: "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"  # noqa: E731
    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


# Characters of plain text that LaTeX reads as markup (a model, task or hardware name in a caption may hold any).
LATEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
              "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$", "±": r"$\pm$"}


def _latex_text(text: str) -> str:
    """Plain text (a caption, a note) as LaTeX."""
    return "".join(LATEX_TEXT.get(char, char) for char in text)


def to_latex(frame: pd.DataFrame, caption: str, label: str, note: str = "") -> str:
    latex_frame = frame.copy()
    for column in latex_frame.columns:
        latex_frame[column] = latex_frame[column].str.replace("×", r"$\times$", regex=False).str.replace("±", r"$\pm$", regex=False)
    styler = latex_frame.style.hide(axis="index")
    styler = styler.format(escape="latex", subset=["method"])
    latex = styler.to_latex(
        hrules=True, caption=_latex_text(caption), label=label, position_float="centering",
        column_format="l" + "r" * (len(frame.columns) - 1),
    )
    if note:  # under the tabular, inside the table float
        latex = latex.replace("\\end{table}", f"\\par\\footnotesize {_latex_text(note)}\n\\end{{table}}")
    return latex


NOTES = (
    "accuracy: primary metric in % (± stderr); tok/s: useful tokens per second of generation "
    "(± std over timing repeats, where recorded); speedup: generation time of the `none` row over "
    "this row's for the same samples (± both throughputs' spreads combined); latency: mean seconds "
    "per sample; ideal: 1 / recompute ratio; (noisy): the speedup exceeds its ideal by more than "
    f"{IDEAL_TOLERANCE:.0%} or a throughput it comes from varied by more than {NOISY_RELATIVE_STD:.0%}."
)


def render(tables: list[tuple[dict, pd.DataFrame]]) -> tuple[str, str, pd.DataFrame]:
    """(Markdown, LaTeX, summary rows) of the tables."""
    md, tex, rows = [NOTES + "\n"], ["% " + NOTES + "\n% needs \\usepackage{booktabs}\n"], []
    for key, table in tables:
        frame, note = display_frame(table), noisy_note(table)
        title = title_of(key)
        md.append(f"### {title}\n\n{to_markdown(frame)}\n" + (f"\n{note}\n" if note else ""))
        label = "tab:" + re.sub(r"[^A-Za-z0-9]+", "-", f"{key['model']}-{key['task']}-{key['n_shot']}-{key['gen_length']}").strip("-")
        tex.append(to_latex(frame, title, label, note))
        rows.append(table.assign(**{k: key[k] for k in TABLE_KEYS}))
    summary = pd.concat(rows, ignore_index=True)
    summary = summary[TABLE_KEYS + [c for c in summary.columns if c not in TABLE_KEYS]]
    return "\n".join(md), "\n".join(tex), summary


OUT_FILES = ("tables.md", "tables.tex", "summary.csv")
AUP_FILES = ("aup.md", "aup.tex", "aup.csv")


def write_outputs(md: str, tex: str, summary: pd.DataFrame, out: Path,
                  aup_outputs: tuple[str, str, pd.DataFrame] | None = None) -> tuple[list[Path], list[Path]]:
    """Write tables.md / .tex, summary.csv, and with ``aup_outputs`` (render_aup's) aup.md / .tex /
    .csv; without them, remove the AUP files an earlier run left in ``out`` (they would describe
    tables this tables.md lacks). Returns (paths written, paths removed)."""
    out.mkdir(parents=True, exist_ok=True)
    files = dict(zip(OUT_FILES, (md, tex, summary.to_csv(index=False))))
    if aup_outputs is not None:
        aup_md, aup_tex, aup_rows = aup_outputs
        files.update(zip(AUP_FILES, (aup_md, aup_tex, aup_rows.to_csv(index=False))))
    for name, text in files.items():
        write_atomic(out / name, text)
    stale = [out / name for name in AUP_FILES if name not in files and (out / name).exists()]
    for path in stale:
        path.unlink()
    return [out / name for name in files], stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="results CSV written by run.py (results_csv)")
    parser.add_argument("--out", help="folder to write tables.md, tables.tex, summary.csv to (without it: print only)")
    parser.add_argument("--published", default=None, help="results/published.csv: the papers' numbers side by side")
    parser.add_argument("--experiment", default=None, help="only rows of this experiment")
    args = parser.parse_args(argv)
    try:  # every input checked before anything is printed or written
        runs = load_runs(args.csv, args.experiment)
        published = load_published(args.published) if args.published else None
        if args.out is not None:
            make_out_folder(args.out, files=OUT_FILES + AUP_FILES)
    except ValueError as err:
        parser.error(str(err))
    tables = build_tables(runs, published)
    md, tex, summary = render(tables)
    print(md)
    aup_tables = build_aup_tables(runs)
    aup_outputs = render_aup(aup_tables) if aup_tables else None  # no run recorded tokens_per_forward: no AUP
    if aup_outputs is not None:
        print(aup_outputs[0])
    if args.out is not None:
        written, stale = write_outputs(md, tex, summary, Path(args.out), aup_outputs)
        print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
        if stale:
            print(f"removed {', '.join(map(str, stale))} (an earlier run's; this CSV has no AUP tables)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
