"""End to end: ``run.py`` on every local task twin with two cache methods (tiny LLaDA, CPU,
offline, W&B offline), and the CSV row, metrics.json, samples.jsonl and the W&B run agree.
"""
from __future__ import annotations

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("gsm8k_local", "math_local", "humaneval_local", "mmlu_local")
CACHES = ("none", "dkv_decode")
LIMIT = 2
GEN = 32


def wandb_records(path: Path):
    """Records of a W&B transaction log (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_summary(run_dir: Path) -> dict:
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    summary = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def same(csv_value: str, value) -> bool:
    """A CSV cell (text) against the JSON value of the same field."""
    if value is None:
        return csv_value == ""
    if isinstance(value, bool):
        return csv_value == str(value)
    if isinstance(value, (int, float)):
        return math.isclose(float(csv_value), value, rel_tol=1e-12)
    return csv_value == str(value)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One Hydra multirun: 4 task twins x 2 cache methods = 8 runs in one process (``++`` because
    the sweep first checks the overrides against the default task, which lacks these keys)."""
    base = tmp_path_factory.mktemp("e2e")
    env = subprocess_env(base)
    results_csv = base / "runs.csv"
    command = [
        sys.executable, "run.py", "-m",
        "model=tiny_llada", f"task={','.join(TASKS)}", f"cache={','.join(CACHES)}",
        f"++task.limit={LIMIT}", f"++task.gen_length={GEN}", "++task.n_shot=1", "++task.allow_code_execution=true",
        "logger=wandb", f"results_csv={results_csv}", f"hydra.sweep.dir={base / 'sweep'}",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return base, rows, done.stdout


def test_one_row_per_run(sweep):
    _, rows, stdout = sweep
    assert sorted((r["task"], r["cache"]) for r in rows) == sorted((t, c) for t in TASKS for c in CACHES)
    metrics = {r["task"]: r["accuracy_metric"] for r in rows}
    assert metrics == {
        "gsm8k_local": "exact_match,flexible-extract",
        "math_local": "exact_match,none",
        "humaneval_local": "pass@1,create_test",
        "mmlu_local": "acc,none",
    }
    for r in rows:
        assert r["status"] == "ok" and r["model"] == "tiny_llada" and r["limit"] == str(LIMIT)
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert r["run_id"] and r["git_commit"] and r["device"] == "cpu"
        expected_samples = 2 * LIMIT if r["task"] == "mmlu_local" else LIMIT  # mmlu: 2 subjects
        assert int(r["n_samples"]) == expected_samples
        assert r["n_shot"] == ("0" if r["task"] == "humaneval_local" else "1")  # HumanEval: fixed 0-shot
        if r["task"] == "mmlu_local":  # likelihood task: no generation, no speed numbers
            assert r["nfe"] == "0" and r["throughput_useful_tok_s"] == ""
        else:
            assert int(r["all_tokens"]) == LIMIT * GEN and int(r["nfe"]) == LIMIT * GEN
            assert 0 < int(r["useful_tokens"]) <= LIMIT * GEN
            assert float(r["throughput_all_tok_s"]) == pytest.approx(int(r["all_tokens"]) / float(r["gen_seconds"]))
            assert r["cache.refresh_interval"] == ("8" if r["cache"] == "dkv_decode" else "")
            ratio = float(r["recompute_ratio"])
            assert ratio == 1.0 if r["cache"] == "none" else ratio < 1.0
    assert stdout.count("useful tok/s") == len(TASKS) * len(CACHES)  # the printed summaries


def test_run_dir_and_wandb_carry_the_csv_numbers(sweep):
    _, rows, _ = sweep
    for r in rows:
        run_dir = Path(r["run_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics) <= set(r)
        for key, value in metrics.items():
            assert same(r[key], value), (r["task"], r["cache"], key, r[key], value)
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == metrics["n_samples"]
        assert sum(bool(s["correct"]) for s in samples) / len(samples) == pytest.approx(metrics["accuracy"])
        if r["task"] != "mmlu_local":
            assert sum(s["useful_tokens"] for s in samples) == metrics["useful_tokens"]
            assert all(s["prompt"] and "generation" in s for s in samples)
        summary = wandb_summary(run_dir)
        for key, value in metrics.items():
            if value is not None:
                assert summary[key] == pytest.approx(value) if isinstance(value, float) else summary[key] == value, key
        assert summary["samples/nrows"] == len(samples)
        assert (run_dir / "config.yaml").is_file() and (run_dir / "lm_eval_results.json").is_file()

