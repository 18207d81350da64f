"""scripts/bench.py runs end to end on the smoke preset and writes the documented JSON rows."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"method", "decoding", "tokens_per_s", "speedup", "ideal_speedup", "efficiency", "peak_mem_gb", "agreement"}
CORE = {"dkv_decode", "dkv_greedy", "d2cache"}


def run_bench(*extra: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "smoke", "--threads", "1", "--repeats", "2", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )


def test_bench_smoke_writes_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--json", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert row["repeats"] == 2
        assert row["tokens_per_s"] > 0 and row["ideal_speedup"] >= 1 and 0 <= row["agreement"] <= 1
        assert math.isclose(row["efficiency"], row["speedup"] / row["ideal_speedup"], rel_tol=1e-9)
        # bare forward times at 1, 32 and all P + G = 48 active rows
        assert set(row["bare_forward_ms"]) == {"1", "32", "48"} and min(row["bare_forward_ms"].values()) > 0
    methods = [r["method"] for r in rows]
    assert CORE <= set(methods)
    # one none per decoding, each compared method sits with the none of its own decoding
    nones = {r["decoding"]: r for r in rows if r["method"] == "none"}
    assert len(nones) == sum(m == "none" for m in methods) == 3
    for row in rows:
        assert row["decoding"] in nones
        if row["method"] == "none":
            assert row["speedup"] == 1 and row["agreement"] == 1 and row["ideal_speedup"] == 1
        else:
            assert row["ideal_speedup"] > 1
    assert "low_confidence" in next(r for r in rows if r["method"] == "dkv_decode")["decoding"]
    assert "random" in next(r for r in rows if r["method"] == "dkv_greedy")["decoding"]
    assert "certainty_prior" in next(r for r in rows if r["method"] == "d2cache")["decoding"]
    assert "speedup" in proc.stdout and "| method" in proc.stdout  # the table is printed


def test_bench_rejects_unknown_method(tmp_path):
    proc = run_bench("--methods", "dkv_decode,bogus", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "d2cache" in proc.stderr
