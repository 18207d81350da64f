"""AUP (accuracy under parallelism, d3LLM's leaderboard metric) in scripts/aggregate.py: the formula
on hand-computed examples and on d3LLM's own leaderboard data, its edge cases and monotonicity, and
the AUP tables aggregate writes beside its other outputs."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import aggregate  # noqa: E402
from aggregate import aup, aup_points, aup_weight  # noqa: E402


# ----------------------------------------------------------------------------------------------- formula
def test_weight_is_one_at_the_reference_and_exponential_below():
    assert aup_weight(80.0, 80.0) == 1.0
    assert aup_weight(0.0, 80.0) == pytest.approx(math.exp(-3.0))
    assert aup_weight(60.0, 80.0) == pytest.approx(math.exp(-0.75))  # 1 - 60/80 = 0.25, times alpha 3
    assert aup_weight(90.0, 80.0) == 1.0  # capped: above the reference is not rewarded
    assert aup_weight(60.0, 80.0, alpha=0.0) == 1.0


def test_hand_computed_examples():
    # One point: the rectangle rho_1 * y_1, never weighted (d3LLM's autoregressive rows: 1.0 * accuracy).
    assert aup([(1.0, 80.0)], y_max=90.0) == pytest.approx(80.0)
    assert aup([(2.5, 60.0)], y_max=90.0) == pytest.approx(150.0)
    # No accuracy lost: the full rectangle rho_n * y_max.
    assert aup([(1.0, 80.0), (4.0, 80.0)], y_max=80.0) == pytest.approx(320.0)
    # 80 + (3 - 1) * (76 * e^{-3 * 0.05} + 80 * 1) / 2 = 80 + 65.4138... + 80
    expected = 80.0 + 76.0 * math.exp(-0.15) + 80.0
    assert expected == pytest.approx(225.41380621)
    assert aup([(1.0, 80.0), (3.0, 76.0)], y_max=80.0) == pytest.approx(expected)
    assert aup([(3.0, 76.0), (1.0, 80.0)], y_max=80.0) == pytest.approx(expected)  # any input order


@pytest.mark.parametrize("points, y_max, expected", [
    # d3LLM's get_aup (AUP_leaderboard/aup_utils.py @ e5bfcac) on its leaderboard data
    # (AUP_leaderboard/data_llada.yaml); y_max: the task's best accuracy over all methods.
    ([(1.0, 74.02), (9.11, 73.09)], 74.98, 637.6549264841269),  # GSM8K-CoT, d3LLM-LLaDA
    ([(1.0, 74.79), (2.77, 74.68)], 74.98, 205.78111501189068),  # GSM8K-CoT, Fast-dLLM-LLaDA
    ([(1.0, 74.98), (2.88, 74.39)], 74.98, 213.75642318967476),  # GSM8K-CoT, D2F (holds y_max)
    ([(1.0, 74.1)], 74.98, 74.1),  # GSM8K-CoT, Qwen-2.5-7B-it (autoregressive: one point)
    ([(1.0, 32.76), (5.74, 30.36)], 41.15, 107.64192720243037),  # MATH, d3LLM-LLaDA: y_max is the AR model's
    ([(1.0, 32.0), (3.17, 30.18)], 41.15, 64.53561169036588),  # MATH, dParallel-LLaDA
    ([(1.0, 78.32), (6.95, 74.22)], 82.56, 441.1296309795399),  # Long-GSM8K, d3LLM-LLaDA
])
def test_d3llm_leaderboard_values(points, y_max, expected):
    assert aup(points, y_max) == pytest.approx(expected, rel=1e-12)


def test_points_more_than_five_below_the_first_are_left_out():
    points = [(1.0, 80.0), (2.0, 70.0), (3.0, 78.0)]  # y_min = 80 - 5 = 75: the middle point does not count
    assert aup_points(points) == [(1.0, 80.0), (3.0, 78.0)]
    assert aup(points, 80.0) == pytest.approx(aup([(1.0, 80.0), (3.0, 78.0)], 80.0))
    # Exactly 5 points below counts, also through the float noise of the CSV's fraction -> %.
    assert len(aup_points([(1.0, 0.62 * 100), (2.0, 0.57 * 100)])) == 2


def test_a_curve_ending_more_than_five_below_its_first_has_no_aup():
    with pytest.raises(ValueError, match=r"accuracy at TPF 3.00 is 70.0 %, 10.0 points below its first"):
        aup([(1.0, 80.0), (3.0, 70.0)], 80.0)
    assert aup([(1.0, 80.0), (3.0, 70.0)], 80.0, max_drop=10.0) > 0  # d3LLM's y_min_offset, if widened


def test_points_of_one_tpf_count_once_with_the_best_accuracy():
    tied = [(1.0, 70.0), (2.0, 80.0), (1.0, 80.0)]
    assert aup_points(tied) == [(1.0, 80.0), (2.0, 80.0)]
    assert aup(tied, 80.0) == pytest.approx(160.0)
    assert aup(list(reversed(tied)), 80.0) == pytest.approx(160.0)


@pytest.mark.parametrize("points, y_max, message", [
    ([], 80.0, "at least one"),
    ([(0.0, 80.0)], 80.0, "positive"),
    ([(-1.0, 80.0)], 80.0, "positive"),
    ([(float("nan"), 80.0)], 80.0, "positive"),
    ([(1.0, 180.0)], 80.0, r"in % \(0..100\)"),
    ([(1.0, -1.0)], 80.0, r"in % \(0..100\)"),
    ([(1.0, 80.0)], 0.0, "y_max"),
    ([(1.0, 80.0)], 120.0, "y_max"),
])
def test_bad_input_is_refused_with_a_clear_message(points, y_max, message):
    with pytest.raises(ValueError, match=message):
        aup(points, y_max)


# ----------------------------------------------------------------------------------------------- monotonicity
CURVE = [(1.0, 78.0), (2.0, 77.0), (3.5, 76.5), (6.0, 74.0)]  # within 5 points: nothing left out


def test_more_accuracy_at_any_point_gives_more_aup():
    base = aup(CURVE, 80.0)
    for i in range(len(CURVE)):
        better = [(r, y + 1.0 if j == i else y) for j, (r, y) in enumerate(CURVE)]
        assert aup(better, 80.0) > base, i


def test_more_parallelism_at_the_same_accuracy_gives_more_aup():
    assert aup(CURVE + [(8.0, 74.0)], 80.0) > aup(CURVE, 80.0)
    stretched = [(r * 1.5, y) for r, y in CURVE]
    assert aup(stretched, 80.0) == pytest.approx(1.5 * aup(CURVE, 80.0))  # linear in the TPF axis


def test_a_harsher_penalty_or_a_higher_reference_lowers_aup():
    values = [aup(CURVE, 80.0, alpha=a) for a in (0.0, 1.0, 3.0, 10.0)]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4
    values = [aup(CURVE, y_max) for y_max in (78.0, 80.0, 90.0, 100.0)]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4


def test_without_penalty_it_is_the_area_under_the_curve_from_zero():
    area = 1.0 * 78.0 + sum(0.5 * (r1 - r0) * (y0 + y1) for (r0, y0), (r1, y1) in zip(CURVE, CURVE[1:]))
    assert aup(CURVE, 80.0, alpha=0.0) == pytest.approx(area)
    assert aup(CURVE, 80.0) < area < 6.0 * 80.0  # the penalty only takes away; lossless is the bound


# ----------------------------------------------------------------------------------------------- aggregate
BASE = {
    "status": "ok", "model": "llada", "task": "gsm8k", "n_shot": "4", "limit": "", "batch_size": "1",
    "gen_length": "256", "seed": "0", "device": "cuda", "gpu_name": "H100", "accuracy_stderr": "0.01",
    "n_samples": "1319", "gen_seconds": "100", "throughput_all_tok_s": "30", "throughput_useful_tok_s": "30",
    "checkpoint": "GSAI-ML/LLaDA-8B-Instruct", "lm_eval_task": "gsm8k", "code_scoring": "",
}


RUN_IDS = itertools.count()  # each row its own run key: no row replaces another


def run(cache: str, decoding: str, accuracy: float, tpf: float | None, **extra) -> dict:
    """One ok row; the CSV's accuracy is a fraction, ``tpf`` None leaves tokens_per_forward empty."""
    n = next(RUN_IDS)
    row = dict(BASE, cache=cache, decoding=decoding, accuracy=str(accuracy),
               tokens_per_forward="" if tpf is None else str(tpf),
               started_at=f"2026-01-01T00:00:{n % 60:02d}", run_key=f"key-{n}")
    row.update(extra)
    return row


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).fillna("").to_csv(path, index=False)
    return path


@pytest.fixture
def curves_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "runs.csv", [
        run("none", "low_confidence", 0.80, 1.0),
        run("none", "threshold", 0.76, 3.0, **{"decoding.threshold": "0.9"}),
        run("none", "random", 0.70, 1.0),  # one token per step too: the better run at TPF 1 counts
        run("prefix", "low_confidence", 0.78, 1.0),
        run("prefix", "threshold", 0.77, 2.5, **{"decoding.threshold": "0.9"}),
        run("dual", "low_confidence", 0.79, None),  # no tokens_per_forward recorded: not a point
        run("dkv_decode", "low_confidence", 0.80, 1.0, **{"cache.refresh_interval": "8"}),
        run("dkv_decode", "threshold", 0.60, 4.0, **{"cache.refresh_interval": "8.0"}),  # 20 points lost
        run("none", "low_confidence", 0.50, 1.0, gen_length="64"),  # another table, its own y_max
    ])


def test_aup_table_per_model_task_setting_one_row_per_cache(curves_csv):
    tables = aggregate.build_aup_tables(aggregate.load_runs(curves_csv))
    assert [key["gen_length"] for key, _ in tables] == ["64", "256"]
    (_, short), (_, table) = tables
    assert short["AUP"].tolist() == [pytest.approx(50.0)] and short["y_max"].tolist() == [50.0]
    table = table.set_index("method")
    assert list(table.index) == ["none", "prefix", "dkv_decode R=8"]  # dual has no point: no row
    assert set(table["y_max"]) == {80.0}  # the table's best run, in %
    assert table.loc["none", "AUP"] == pytest.approx(aup([(1.0, 80.0), (3.0, 76.0)], 80.0))
    assert table.loc["none", "AUP"] == pytest.approx(80.0 + 76.0 * math.exp(-0.15) + 80.0)
    assert (table.loc["none", "runs"], table.loc["none", "points"]) == (3, 2)
    assert table.loc["prefix", "AUP"] == pytest.approx(aup([(1.0, 78.0), (2.5, 77.0)], 80.0))
    # "8" and "8.0" are one setting: one curve, which loses too much for an AUP.
    assert table.loc["dkv_decode R=8", "runs"] == 2
    assert pd.isna(table.loc["dkv_decode R=8", "AUP"])
    assert "20.0 points below its first" in table.loc["dkv_decode R=8", "why"]


def test_aggregate_prints_and_writes_the_aup_tables(curves_csv, tmp_path, capsys):
    assert aggregate.main([str(curves_csv), "--out", str(tmp_path / "tables")]) == 0
    out = tmp_path / "tables"
    assert {p.name for p in out.iterdir()} == {"tables.md", "tables.tex", "summary.csv", "aup.md", "aup.tex", "aup.csv"}
    md = (out / "aup.md").read_text()
    assert md in capsys.readouterr().out
    assert "### AUP · llada · gsm8k · 4-shot L=256 H100" in md and "### AUP · llada · gsm8k · 4-shot L=64 H100" in md
    none_aup = aup([(1.0, 80.0), (3.0, 76.0)], 80.0)
    assert f"| {none_aup:.1f} |" in md
    assert "1.00–3.00" in md and "80.0–76.0" in md  # TPF and accuracy at the curve's first and last point
    assert "y_max = 80.0 % (none, low_confidence)" in md
    assert "dkv_decode R=8: no AUP, accuracy at TPF 4.00 is 60.0 %" in md
    tex = (out / "aup.tex").read_text()
    assert tex.count(r"\toprule") == 2 and r"\label{tab:aup-llada-gsm8k-4-256}" in tex
    rows = pd.read_csv(out / "aup.csv")
    assert set(aggregate.TABLE_KEYS) <= set(rows.columns)
    assert rows.loc[(rows["method"] == "none") & (rows["gen_length"] == 256), "AUP"].item() == pytest.approx(none_aup)
    # The other tables are untouched by AUP.
    assert "AUP" not in (out / "tables.md").read_text()


def test_no_aup_where_no_run_recorded_tokens_per_forward(tmp_path, capsys):
    rows = [run("none", "low_confidence", 0.8, None), run("prefix", "low_confidence", 0.78, None)]
    csv = write_csv(tmp_path / "runs.csv", [{k: v for k, v in r.items() if k != "tokens_per_forward"} for r in rows])
    assert aggregate.build_aup_tables(aggregate.load_runs(csv)) == []
    assert aggregate.main([str(csv), "--out", str(tmp_path / "tables")]) == 0
    assert {p.name for p in (tmp_path / "tables").iterdir()} == {"tables.md", "tables.tex", "summary.csv"}
    assert "AUP" not in capsys.readouterr().out


def test_a_point_left_out_is_named_under_its_table(tmp_path):
    csv = write_csv(tmp_path / "runs.csv", [
        run("prefix", "low_confidence", 0.80, 1.0),
        run("prefix", "threshold", 0.70, 2.0, **{"decoding.threshold": "0.7"}),  # 10 below the first
        run("prefix", "threshold", 0.78, 3.0, **{"decoding.threshold": "0.9"}),
    ])
    ((_, table),) = aggregate.build_aup_tables(aggregate.load_runs(csv))
    assert table["AUP"].item() == pytest.approx(aup([(1.0, 80.0), (3.0, 78.0)], 80.0))
    assert (table["runs"].item(), table["points"].item()) == (3, 2)
    assert "prefix: left out TPF 2.00 (70.0 %)" in aggregate.aup_note(table)


def test_aup_files_of_an_earlier_run_do_not_outlive_it(curves_csv, tmp_path, capsys):
    """--out reused for a CSV without tokens_per_forward: the earlier run's aup.* would describe
    tables that the new tables.md lacks, so they go; other files in the folder stay."""
    out = tmp_path / "tables"
    assert aggregate.main([str(curves_csv), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    csv = write_csv(tmp_path / "older.csv", [{k: v for k, v in run("none", "low_confidence", 0.8, None).items()
                                              if k != "tokens_per_forward"}])
    assert aggregate.main([str(csv), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"tables.md", "tables.tex", "summary.csv", "notes.txt"}
    assert f"removed {out / 'aup.md'}" in capsys.readouterr().err
