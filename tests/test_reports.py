"""scripts/aggregate.py and scripts/plot.py on small hand-written results CSVs: aggregate prints and
writes only where --out says, marks noisy speedups, shows the timing spread; plot draws error bars,
one marker shape per method, shared axes, speedup values clear of the ideal lines, and eager and
compiled bench rows as separate lines. Both refuse bad input with one error line before any output,
and replace their files whole."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import aggregate  # noqa: E402

# The columns aggregate reads, plus the record's newer ones that must not disturb the tables.
BASE = {
    "status": "ok", "model": "llada", "task": "gsm8k", "n_shot": "4", "limit": "", "batch_size": "1",
    "gen_length": "256", "steps": "256", "block_length": "32", "seed": "0", "device": "cuda", "gpu_name": "H100",
    "accuracy": "0.78", "accuracy_stderr": "0.011", "n_samples": "1319", "all_tokens": "337664",
    "latency_s_mean": "1.0", "lm_eval_task": "gsm8k", "checkpoint": "GSAI-ML/LLaDA-8B-Instruct",
    "code_scoring": "", "mask_tokens_left": "0",
}


def run_row(cache: str, tok_s: float, ideal: float, rel_std: float | None = None, **extra) -> dict:
    """One ok row: ``tok_s`` all-token (= useful) throughput, ``rel_std`` its relative std over
    timing repeats (None: one timing, std cells empty)."""
    std = "" if rel_std is None else str(tok_s * rel_std)
    row = dict(BASE, cache=cache, decoding="low_confidence", started_at=f"2026-01-01T00:00:{len(cache):02d}",
               run_key=f"key-{cache}-{tok_s}", gen_seconds=str(337664 / tok_s),
               throughput_useful_tok_s=str(tok_s), throughput_all_tok_s=str(tok_s), ideal_speedup=str(ideal),
               timing_repeats="1" if rel_std is None else "5",
               throughput_useful_tok_s_std=std, throughput_all_tok_s_std=std)
    row.update(extra)
    return row


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).fillna("").to_csv(path, index=False)
    return path


def table_of(path: Path) -> pd.DataFrame:
    ((_, table),) = aggregate.build_tables(aggregate.load_runs(path))
    return table.set_index("method")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------- aggregate
def test_aggregate_without_out_prints_and_writes_nothing(tmp_path, monkeypatch, capsys):
    csv = write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)])
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    assert aggregate.main([str(csv)]) == 0
    assert files_under(tmp_path) == before
    printed = capsys.readouterr().out
    assert "### llada · gsm8k · 4-shot L=256 H100" in printed
    assert "| prefix" in printed and "3.00×" in printed


def test_aggregate_with_out_writes_the_three_files(tmp_path, monkeypatch, capsys):
    csv = write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)])
    monkeypatch.chdir(tmp_path)
    assert aggregate.main([str(csv), "--out", "tables"]) == 0
    assert {p.name for p in files_under(tmp_path / "tables")} == {"tables.md", "tables.tex", "summary.csv"}
    assert (tmp_path / "tables" / "tables.md").read_text() in capsys.readouterr().out


def test_speedup_above_its_ideal_is_noisy(tmp_path):
    csv = write_csv(tmp_path / "runs.csv", [
        run_row("none", 10.0, 1.0),
        run_row("prefix", 35.0, 3.2),  # 3.5x > 3.2x: caching cannot beat skipping the work
        run_row("dual", 32.5, 3.2),  # 3.25x: within 2 % of the bound, timing jitter
    ])
    table = table_of(csv)
    assert table.loc["prefix", "noisy"] == "above its ideal 3.20×"
    assert table.loc["dual", "noisy"] == "" and table.loc["none", "noisy"] == ""
    md = aggregate.render(aggregate.build_tables(aggregate.load_runs(csv)))[0]
    assert "3.50× (noisy)" in md and "3.25× |" in md
    assert "prefix: above its ideal 3.20×" in md  # the note under the table says why


def test_throughput_spread_is_shown_and_above_ten_percent_is_noisy(tmp_path):
    csv = write_csv(tmp_path / "runs.csv", [
        run_row("none", 10.0, 1.0, rel_std=0.05),
        run_row("prefix", 30.0, 3.2, rel_std=0.15),
        run_row("dual", 25.0, 3.2, rel_std=0.02),
    ])
    table = table_of(csv)
    # The std of a ratio of independent timings: relative stds in quadrature.
    assert table.loc["prefix", "speedup std"] == pytest.approx(3.0 * math.hypot(0.15, 0.05))
    assert table.loc["prefix", "noisy"] == "throughput ± 15.0%"
    assert table.loc["dual", "noisy"] == ""
    assert pd.isna(table.loc["none", "speedup std"])  # the baseline against itself: exactly 1
    frame = aggregate.display_frame(table.reset_index()).set_index("method")
    assert frame.loc["prefix", "tok/s"] == "30.0 ± 4.5"
    assert frame.loc["prefix", "speedup"] == "3.00 ± 0.47× (noisy)"
    assert frame.loc["dual", "speedup"] == "2.50 ± 0.13×"


def test_noisy_baseline_makes_every_speedup_noisy(tmp_path):
    csv = write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0, rel_std=0.2), run_row("prefix", 30.0, 3.2)])
    assert table_of(csv).loc["prefix", "noisy"] == "baseline throughput ± 20.0%"


def test_old_csv_without_spread_columns(tmp_path):
    """A CSV from before the std columns (the committed example without them): no ± on tok/s, no
    speedup spread."""
    import pandas as pd

    frame = pd.read_csv(ROOT / "results" / "reference" / "example_runs.csv", dtype=str, keep_default_na=False)
    assert "throughput_useful_tok_s_std" in frame  # the committed runs do have them (timing.repeats: 3)
    old = tmp_path / "old.csv"
    frame.drop(columns=[c for c in frame if c.endswith("_std") or c == "timing_repeats"]).to_csv(old, index=False)
    for _, table in aggregate.build_tables(aggregate.load_runs(old)):
        frame = aggregate.display_frame(table)
        assert not frame["tok/s"].str.contains("±").any()
        assert not frame["speedup"].str.contains("±").any()
        assert table["speedup std"].isna().all()


def test_new_record_columns_neither_split_nor_merge_tables(tmp_path):
    """lm_eval_task, checkpoint... are not table keys: one table; two runs of one method that differ
    only in them stay two rows, labelled by what differs."""
    csv = write_csv(tmp_path / "runs.csv", [
        run_row("none", 10.0, 1.0, lm_eval_task="gsm8k_cot"),
        run_row("prefix", 30.0, 3.2),
        run_row("prefix", 28.0, 3.2, checkpoint="/ckpt/llada-finetuned"),
        run_row("dual", 40.0, 3.2, run_key=""),  # a row written before run_key existed
        run_row("d2cache", 40.0, 3.2, cut_at_eos="True"),
        run_row("d2cache", 41.0, 3.2, cut_at_eos="False"),  # scored as LLaDA's eval_llada.py
        run_row("d2cache", 39.0, 3.2, cut_at_eos="True", cut_at_until="False"),  # Dream's escape_until
        run_row("dual", 38.0, 3.2, chat="False"),  # prompted without the chat template
    ])
    tables = aggregate.build_tables(aggregate.load_runs(csv))
    assert len(tables) == 1
    assert set(tables[0][1]["method"]) == {
        "none", "prefix (GSAI-ML/LLaDA-8B-Instruct)", "prefix (/ckpt/llada-finetuned)", "dual",
        "d2cache (cut_at_eos=True)", "d2cache (cut_at_eos=False)", "d2cache (cut_at_eos=True, cut_at_until=False)",
        "dual (chat=False)",
    }


# ----------------------------------------------------------------------------------------------- published
PUBLISHED = ROOT / "results" / "published.csv"


def test_paper_method_names_fast_dllm_by_its_decoding():
    assert aggregate.paper_method({"cache": "prefix", "decoding": "low_confidence"}) == "fast_dllm_prefix"
    assert aggregate.paper_method({"cache": "prefix", "decoding": "threshold"}) == "fast_dllm_parallel"
    assert aggregate.paper_method({"cache": "dual", "decoding": "threshold"}) == "fast_dllm_dual"
    for cache in ("none", "elastic", "sparse_dllm", "streaming", "dpad"):
        assert aggregate.paper_method({"cache": cache, "decoding": "threshold"}) == cache
    assert aggregate.display_method({"cache": "prefix", "decoding": "threshold"}) == "prefix"  # + the decoding where it differs


def test_published_task_follows_the_lm_eval_task_where_it_names_the_benchmark():
    assert aggregate.published_task("math", "dllm_minerva_math") == "math"  # the full MATH test set
    assert aggregate.published_task("math", "minerva_math") == "math"
    assert aggregate.published_task("math", "dllm_math500") == "math500"
    assert aggregate.published_task("math", "") == "math500"  # older CSVs: the preset's default
    assert aggregate.published_task("humaneval", "dllm_humaneval_sanitized") == "humaneval"
    assert aggregate.published_task("arith", "arith") is None
    assert {aggregate.PUBLISHED_MODEL[m] for m in ("llada_1_5", "dream_base")} == {"llada-1.5", "dream-v0-base-7b"}


def test_published_decoding_hints():
    assert aggregate.published_decoding("4-shot L=256 B=32 threshold 0.9 flexible-extract") == "threshold"
    assert aggregate.published_decoding("4-shot L=256 B=32 entropy strict-match") == "dream"
    assert aggregate.published_decoding("0-shot low-confidence") == "low_confidence"
    assert aggregate.published_decoding("5-shot L=512") is None


def paper_columns(rows: list[dict], tmp_path: Path) -> dict:
    """{(cache, decoding): (paper acc, paper speedup)} of the one table the rows make."""
    csv = write_csv(tmp_path / "runs.csv", [dict(r, run_key=f"key-{i}") for i, r in enumerate(rows)])
    ((_, table),) = aggregate.build_tables(aggregate.load_runs(csv), aggregate.load_published(PUBLISHED))
    return {(c, d): (a, s) for c, d, a, s in zip(table["cache"], table["decoding"], table["paper acc"], table["paper speedup"])}


def test_published_rows_of_the_dpad_table_by_decoding_and_filter(tmp_path):
    """DPad's README: dpad and none, each with one-token-per-step and threshold decoding; GSM8K's
    strict-match and flexible-extract accuracies."""
    rows = [run_row(cache, tok_s, 1.0, decoding=decoding, accuracy_metric="exact_match,strict-match", experiment="dpad_main")
            for cache, decoding, tok_s in (("none", "low_confidence", 10.0), ("dpad", "low_confidence", 15.0),
                                           ("none", "threshold", 32.0), ("dpad", "threshold", 41.0))]
    strict = paper_columns(rows, tmp_path)
    vanilla_acc, vanilla_speedup = strict.pop(("none", "low_confidence"))
    assert vanilla_acc == 37.38 and pd.isna(vanilla_speedup)  # the README gives the baseline no "1.00x"
    assert strict == {("dpad", "low_confidence"): (63.84, 1.5), ("none", "threshold"): (38.67, 3.21),
                      ("dpad", "threshold"): (64.97, 4.14)}
    flexible = paper_columns([dict(r, accuracy_metric="exact_match,flexible-extract") for r in rows], tmp_path)
    assert flexible[("dpad", "threshold")] == (79.76, 4.14)


def test_published_rows_of_streaming_dllm_by_length(tmp_path):
    """Streaming-dLLM's Table 2: Prefix-Cache and Fast-dLLM (parallel) are the prefix cache with
    two decodings; the L=512 rows, not the L=256 ones."""
    base = dict(model="llada_1_5", n_shot="5", gen_length="512", experiment="streaming_table2")
    rows = [run_row(cache, tok_s, 1.0, decoding=decoding, **base)
            for cache, decoding, tok_s in (("none", "low_confidence", 2.5), ("prefix", "low_confidence", 8.2),
                                           ("prefix", "threshold", 25.8), ("streaming", "threshold", 69.8))]
    assert paper_columns(rows, tmp_path) == {
        ("none", "low_confidence"): (81.0, 1.0), ("prefix", "low_confidence"): (81.0, 3.3),
        ("prefix", "threshold"): (80.4, 10.3), ("streaming", "threshold"): (81.2, 28.0),
    }


def test_published_rows_of_full_math_by_lm_eval_task(tmp_path):
    """task=math is MATH-500 unless its lm-eval task is the full test set (Sparse-dLLM's MATH)."""
    base = dict(task="math", n_shot="4", gen_length="256", accuracy_metric="exact_match,none", experiment="sparse_dllm_table1")
    rows = [run_row("none", 10.0, 1.0, lm_eval_task="dllm_math500", **base),
            run_row("sparse_dllm", 37.0, 3.0, lm_eval_task="dllm_minerva_math", **base)]
    # MATH-500 is not in Sparse-dLLM's table: the first paper's row with that setting (d²Cache's)
    assert paper_columns(rows, tmp_path) == {("none", "low_confidence"): (38.4, 1.0), ("sparse_dllm", "low_confidence"): (34.42, 3.7)}


def test_a_run_is_shown_beside_its_own_experiments_table(tmp_path):
    """LLaDA-1.5 GSM8K L=512 without cache is in Elastic-Cache's and Streaming-dLLM's tables."""
    row = run_row("none", 2.5, 1.0, model="llada_1_5", n_shot="5", gen_length="512")
    assert paper_columns([dict(row, experiment="elastic_table1")], tmp_path) == {("none", "low_confidence"): (81.35, 1.0)}
    assert paper_columns([dict(row, experiment="streaming_table2")], tmp_path) == {("none", "low_confidence"): (81.0, 1.0)}


# ----------------------------------------------------------------------------------------------- plot
@pytest.fixture
def figures(tmp_path, monkeypatch):
    """plot.main on two models x three methods with timing spreads, each ideal line just above its
    bar (where a value written on top of the bar would cross it); {figure name: Figure}."""
    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    rows = []
    for model, speed in (("llada", 1.0), ("dream", 1.2)):
        rows += [run_row(cache, tok_s * speed, ideal, rel_std=0.04, model=model)
                 for cache, tok_s, ideal in (("none", 10.0, 1.0), ("prefix", 20.0, 2.2), ("dual", 29.0, 3.1))]
    csv = write_csv(tmp_path / "runs.csv", rows)
    drawn, save = {}, plot.save

    def keep(fig, out, name):
        drawn[name] = fig
        return save(fig, out, name)

    monkeypatch.setattr(plot, "save", keep)
    monkeypatch.chdir(tmp_path)
    assert plot.main([str(csv)]) == 0
    # No --out: under outputs/ (not committed), never into results/.
    assert {p.name for p in files_under(tmp_path / "outputs" / "figures")} == {
        f"{n}.{e}" for n in ("accuracy_vs_throughput", "speedup") for e in ("pdf", "png")
    }
    return drawn


def test_accuracy_plot_has_error_bars_one_marker_per_method_and_shared_axes(figures):
    import plot
    from matplotlib.container import ErrorbarContainer

    fig = figures["accuracy_vs_throughput"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for ax in axes:
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 3 and all(c.has_xerr and c.has_yerr for c in bars)
        assert len({c.lines[0].get_marker() for c in bars}) == 3
    assert axes[0].get_ylim() == axes[1].get_ylim() and axes[0].get_xlim() == axes[1].get_xlim()
    legend = fig.legends[0]
    markers = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}
    shapes = {method: markers[method].get_marker() for method in ("none", "prefix", "dual")}
    assert shapes == {method: plot.METHOD_STYLE[method][1] for method in shapes}
    assert len(set(shapes.values())) == 3


def test_speedup_plot_values_clear_of_ideal_lines(figures):
    from matplotlib.collections import LineCollection

    fig = figures["speedup"]
    fig.canvas.draw()
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    # Every bar but the two baselines (1 by definition) has a spread.
    assert sum(1 for c in ax.containers if getattr(c, "errorbar", None) is not None) == 4
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 6
    ideals = [  # the horizontal segments (the vertical ones are error bars)
        seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments() if seg[0][1] == seg[1][1]
    ]
    assert len(ideals) == 6
    for (x0, y), (x1, _) in ideals:
        (dx0, dy), (dx1, _) = ax.transData.transform([(x0, y), (x1, y)])
        for box in boxes:
            assert not (box.x0 < dx1 and dx0 < box.x1 and box.y0 <= dy <= box.y1), (box, dy)


def test_batch_scaling_plot_draws_eager_and_compiled_apart(tmp_path, drawn_figures):
    """bench.py --compile: every run eager and compiled at the same batch size; each mode is its own
    line (compiled: hollow markers), not one mode drawn over the other."""
    import json

    import plot

    drawn = drawn_figures
    path = ROOT / "results" / "reference" / "bench_compiled_cpu.json"
    assert plot.main(["--bench-json", str(path), "--out", str(tmp_path)]) == 0
    speed_ax, rate_ax = drawn["batch_scaling"].axes
    lines = {line.get_label(): line for line in speed_ax.get_lines() if not line.get_label().startswith("_")}
    rows = json.loads(path.read_text())
    for method in ("dkv_decode", "prefix", "dual", "dllm_cache", "dkv_greedy", "d2cache"):
        for mode, label in (("eager", method), ("compiled", f"{method} (compiled)")):
            (row,) = [r for r in rows if r["method"] == method and r["mode"] == mode]
            assert list(lines.pop(label).get_ydata()) == [row["speedup"]], label
    assert not lines
    throughput = {line.get_label(): line for line in rate_ax.get_lines()}
    assert {"none (low_confidence)", "none (low_confidence, compiled)", "dual", "dual (compiled)"} <= set(throughput)
    assert throughput["dual (compiled)"].get_markerfacecolor() == "white"
    assert throughput["dual (compiled)"].get_color() == throughput["dual"].get_color() != "white"


# ----------------------------------------------------------------------------------------------- bad input
def refused(main, argv: list[str], capsys) -> str:
    """The error line of a refused command: argparse's exit 2, no traceback, nothing on stdout."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    rows = [run_row("none", 10.0, 1.0, experiment="a"), run_row("prefix", 30.0, 3.2, experiment="a")]
    without = lambda column: [{k: v for k, v in r.items() if k != column} for r in rows]  # noqa: E731
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text(",".join(rows[0]) + "\n")
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "good": write_csv(tmp_path / "runs.csv", rows),
        "empty": tmp_path / "empty.csv",
        "header": tmp_path / "header.csv",
        "failed": write_csv(tmp_path / "failed.csv", [dict(r, status="error") for r in rows]),
        "no_started_at": write_csv(tmp_path / "no_started_at.csv", without("started_at")),
        "no_experiment": write_csv(tmp_path / "no_experiment.csv", without("experiment")),
        "wrong": write_csv(tmp_path / "wrong.csv", [{"x": "1", "y": "2"}]),
        "no_accuracy": write_csv(tmp_path / "no_accuracy.csv", [dict(r, accuracy="") for r in rows]),
        "limit": write_csv(tmp_path / "limit.csv", [dict(r, limit="abc") for r in rows]),
        "batch": write_csv(tmp_path / "batch.csv", [rows[0], dict(rows[1], batch_size="-3")]),
        "n_shot": write_csv(tmp_path / "n_shot.csv", [dict(r, n_shot="1.5") for r in rows]),
        "file": tmp_path / "a_file",
        "missing": tmp_path / "missing.csv",
    }


def test_aggregate_refuses_bad_input_before_printing_or_writing(bad_inputs, tmp_path, capsys):
    f = {k: str(v) for k, v in bad_inputs.items()}
    cases = [
        ([f["missing"]], "missing.csv: cannot read it (No such file or directory)"),
        ([str(tmp_path)], "cannot read it (Is a directory)"),
        ([f["empty"]], "empty.csv: not a CSV (No columns to parse from file)"),
        ([f["header"]], "header.csv: no rows"),
        ([f["failed"]], "failed.csv: no ok rows (statuses there: ['error'])"),
        ([f["no_started_at"]], "is not a results CSV (missing columns ['started_at'])"),
        ([f["good"], "--experiment", "b"], "--experiment 'b': no ok row of it in " + f["good"] + " (experiments there: ['a'])"),
        ([f["no_experiment"], "--experiment", "a"], "--experiment 'a': " + f["no_experiment"] + " has no experiment column"),
        ([f["good"], "--published", f["wrong"]], "wrong.csv lacks columns ['method', 'model', 'score'"),
        ([f["good"], "--published", f["missing"]], "missing.csv: cannot read it"),
        # Table keys label the tables: a damaged cell is named, not printed as a heading.
        ([f["limit"]], "row 1 (model=llada, cache=none, decoding=low_confidence, started_at=2026-01-01T00:00:04): "
                       "limit='abc' (allowed: an integer >= 1 or a fraction in (0, 1), as task.limit, or an empty cell)"),
        ([f["batch"]], "row 2 (model=llada, cache=prefix, decoding=low_confidence, started_at=2026-01-01T00:00:06): batch_size='-3' (allowed: an integer >= 1"),
        ([f["n_shot"]], "n_shot='1.5' (allowed: an integer >= 0, or an empty cell)"),
        ([f["good"], "--out", f["file"]], f"--out {f['file']}: {f['file']} is a file, not a folder"),
        ([f["good"], "--out", f["file"] + "/tables"], f"{f['file']} is a file, not a folder"),
    ]
    for argv, message in cases:
        assert message in refused(aggregate.main, argv, capsys), argv
    assert bad_inputs["file"].read_text() == "not a folder"


def test_plot_refuses_bad_input_before_drawing_or_running_anything(bad_inputs, tmp_path, monkeypatch, capsys):
    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))

    def no_generation(*args, **kwargs):
        raise AssertionError("a generation ran before the input was checked")

    monkeypatch.setattr(plot, "recompute_maps", no_generation)
    f = {k: str(v) for k, v in bad_inputs.items()}
    jsons = {"text": "not json", "empty": "[]", "object": '{"a": 1}', "rows": '[{"method": "none"}]'}
    good_row = json.loads((ROOT / "results" / "reference" / "bench_batch_cpu.json").read_text())[0]
    for key, value in (("batch_size", "abc"), ("method", 5), ("speedup", None), ("tokens_per_s", "fast"),
                       ("mode", 5)):
        jsons[f"bad_{key}"] = json.dumps([good_row, {**good_row, key: value}])
    for name, text in jsons.items():
        (tmp_path / f"{name}.json").write_text(text)
    figures = tmp_path / "figures"
    line = refused(plot.main, [f["good"], "--out", f["file"]], capsys)
    assert f"--out {f['file']}: {f['file']} is a file, not a folder" in line
    cases = [
        ([f["missing"]], "missing.csv: cannot read it (No such file or directory)"),
        ([f["empty"]], "empty.csv: not a CSV (No columns to parse from file)"),
        ([f["wrong"]], "wrong.csv is not a results CSV (missing columns"),
        ([f["no_accuracy"]], "no_accuracy.csv: no ok row has both an accuracy and a throughput: nothing to plot"),
        ([f["good"], "--published", f["missing"]], "missing.csv: cannot read it"),
        (["--bench-json", str(tmp_path / "text.json"), "--published", f["missing"]],  # no CSV to fade them beside
         "--published '" + f["missing"] + "' applies to a results CSV's figure: give the CSV too"),
        (["--trace", "--experiment", "x"], "--experiment 'x' applies to a results CSV's figure"),
        (["--bench-json", str(tmp_path / "text.json")], "text.json: not JSON (Expecting value: line 1 column 1"),
        (["--bench-json", str(tmp_path / "empty.json")], "empty.json: not a list of scripts/bench.py rows"),
        (["--bench-json", str(tmp_path / "object.json")], "object.json: not a list of scripts/bench.py rows"),
        (["--bench-json", str(tmp_path / "rows.json")], "rows.json: its rows lack ['batch_size', 'decoding'"),
        (["--bench-json", str(tmp_path / "bad_batch_size.json")], "row 2: batch_size='abc' (allowed: an integer >= 1)"),
        (["--bench-json", str(tmp_path / "bad_method.json")], "row 2: method=5 (allowed: a text)"),
        (["--bench-json", str(tmp_path / "bad_speedup.json")], "row 2: speedup=None (allowed: a finite number > 0)"),
        (["--bench-json", str(tmp_path / "bad_tokens_per_s.json")], "row 2: tokens_per_s='fast' (allowed: a finite"),
        (["--bench-json", str(tmp_path / "bad_mode.json")], "row 2: mode=5 (allowed: 'eager', 'compiled')"),
        # A single-batch bench JSON from before --batch-sizes.
        (["--bench-json", str(ROOT / "results" / "reference" / "bench_cpu.json")], "its rows lack ['none_decoding']"),
        # The CSV is fine, but no figure is drawn before the JSON is found missing.
        ([f["good"], "--bench-json", str(tmp_path / "missing.json")], "missing.json: cannot read it"),
        ([f["good"], "--trace", "--model", "foo"], "--model 'foo': no such model config (allowed: d3llm_dream, "),
        (["--trace", "--methods", "none,prefix,foo"], "--methods: unknown ['foo'] (cache configs, comma-separated: d2cache, "),
        (["--trace", "--gen-length", "0"], "--trace, cache none: gen_length=0 must be an integer >= 1"),
        (["--trace", "--prompt", " "], "--prompt ' ': an empty prompt"),
    ]
    for argv, message in cases:
        assert message in refused(plot.main, [*argv, "--out", str(figures)], capsys), argv
    assert not figures.exists()


def test_plot_trace_checks_the_checkpoint_before_loading_it_or_making_the_out_folder(tmp_path, monkeypatch, capsys):
    """--trace reads each run's config.json before anything loads: a gen_length the model has no room
    for, a model the decoding cannot run, a Hub checkpoint that cannot be found offline are one error
    line (exit 2), with no --out folder made and no weights read."""
    import huggingface_hub.constants
    import plot

    import dllm.pipeline

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: nothing cached

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the input was checked")

    monkeypatch.setattr(plot, "recompute_maps", no_loading)
    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", no_loading)
    figures = tmp_path / "out" / "figures"
    cases = [
        (["--gen-length", "100000"], "--trace, cache none: gen_length=100000 leaves no room for a prompt: "
                                     "model=tiny_llada has max_seq_len=4096"),
        # room for gen_length, not for the prompt with it (tokenized with the checkpoint's tokenizer)
        (["--gen-length", "4080", "--block-length", "16"], "--trace, cache none: prompt 0 ("),
        (["--model", "tiny_sdar"], "--trace, cache none: decoding='low_confidence' cannot decode a block-diffusion "
                                   "(block-causal attention) model (allowed: ['block_diffusion', 'fast_dllm_v2'])"),
        (["--model", "llada", "--methods", "dual"], "--trace, cache dual: model.path='GSAI-ML/LLaDA-8B-Instruct': "
                                                    "cannot get its config.json from the Hugging Face Hub"),
    ]
    for argv, message in cases:
        line = refused(plot.main, ["--trace", *argv, "--out", str(figures)], capsys)
        assert ": error: " in line and message in line, (argv, line)
    assert not (tmp_path / "out").exists()


def test_cells_that_are_not_numbers_are_refused_naming_column_row_and_value(tmp_path, monkeypatch, capsys):
    """run.py writes a finite number >= 0 or an empty cell; anything else would be shown as "–" or
    break a figure, so both scripts refuse it before any output."""
    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    figures = tmp_path / "figures"
    for column, value in (("accuracy", "abc"), ("throughput_useful_tok_s", "nan"), ("throughput_all_tok_s", "-5"),
                          ("latency_s_mean", "inf")):
        rows = [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2, **{column: value})]
        csv = str(write_csv(tmp_path / "runs.csv", rows))
        for main in (aggregate.main, plot.main):
            line = refused(main, [csv, "--out", str(figures)], capsys)
            assert "runs.csv: row 2 (model=llada, cache=prefix, decoding=low_confidence, " in line, line
            assert f"{column}={value!r} (allowed: a finite number >= 0, or an empty cell)" in line
    for column, value in (("accuracy", "5"), ("accuracy_stderr", "1.5")):  # lm-eval's metrics are fractions
        rows = [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2, **{column: value})]
        line = refused(aggregate.main, [str(write_csv(tmp_path / "runs.csv", rows))], capsys)
        assert f"{column}={value!r} (allowed: a number from 0 to 1, or an empty cell)" in line
    csv = str(write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)]))
    published = pd.read_csv(PUBLISHED, dtype=str, keep_default_na=False)
    published.loc[3, "score"] = "n/a"
    published.to_csv(tmp_path / "published.csv", index=False)
    line = refused(aggregate.main, [csv, "--published", str(tmp_path / "published.csv")], capsys)
    assert "published.csv: row 4 (source=" in line and "score='n/a' (allowed: a finite number >= 0" in line
    assert not figures.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_out_folder_that_cannot_be_made_or_is_empty_is_refused_before_any_output(tmp_path, monkeypatch, capsys):
    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    csv = str(write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)]))
    for main in (aggregate.main, plot.main):
        line = refused(main, [csv, "--out", "/proc/nope/tables"], capsys)
        assert "--out /proc/nope/tables: cannot make the folder (No such file or directory)" in line
        assert "--out '': give a folder to write to" in refused(main, [csv, "--out", ""], capsys)
    # a file the script writes there is a folder: found before the work, nothing written
    for main, blocked in ((aggregate.main, "summary.csv"), (aggregate.main, "aup.tex"), (plot.main, "speedup.png")):
        out = tmp_path / f"out_{blocked}"
        (out / blocked).mkdir(parents=True)
        line = refused(main, [csv, "--out", str(out)], capsys)
        assert f"{blocked} there is not a regular file" in line and [p.name for p in out.iterdir()] == [blocked]


def test_plot_names_every_figure_it_saves():
    """make_out_folder checks plot.FIGURES' files up front: a figure saved under another name would not be."""
    import plot

    saved = set(re.findall(r'save\(fig, out, "(\w+)"\)', Path(plot.__file__).read_text()))
    assert saved == set(plot.FIGURES)


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails (disk full, killed) leaves the previous file, not half of a new one."""
    import matplotlib.pyplot as plt

    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    csv = write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)])
    out = tmp_path / "out"
    out.mkdir()
    for name in ("tables.md", "summary.csv", "speedup.pdf"):
        (out / name).write_text("previous")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    import dllm.atomic

    monkeypatch.setattr(dllm.atomic.os, "replace", full_disk)
    runs = aggregate.load_runs(csv)
    md, tex, summary = aggregate.render(aggregate.build_tables(runs))
    with pytest.raises(OSError):
        aggregate.write_outputs(md, tex, summary, out)
    fig = plt.figure()
    with pytest.raises(OSError):
        plot.save(fig, out, "speedup")
    plt.close(fig)
    previous = dict.fromkeys(("tables.md", "summary.csv", "speedup.pdf"), "previous")
    assert {p.name: p.read_text() for p in out.iterdir()} == previous  # and no temp file left


def test_aggregate_never_compares_across_dtypes_threads_or_processes(tmp_path):
    cpu = dict(device="cpu", gpu_name="")
    rows = [run_row("none", 10.0, 1.0, dtype="float32", threads="1", **cpu),
            run_row("prefix", 30.0, 3.2, dtype="float32", threads="1", **cpu),
            run_row("none", 40.0, 1.0, dtype="bfloat16", threads="1", **cpu),
            run_row("none", 20.0, 1.0, dtype="float32", threads="2", **cpu),
            run_row("none", 25.0, 1.0, dtype="float32", threads="1", processes="2", **cpu)]
    tables = aggregate.build_tables(aggregate.load_runs(write_csv(tmp_path / "runs.csv", rows)))
    captions = sorted(aggregate.setting_text(key) for key, _ in tables)
    assert captions == ["4-shot L=256 cpu bfloat16 1 thread", "4-shot L=256 cpu float32 1 thread",
                        "4-shot L=256 cpu float32 1 thread 2 processes", "4-shot L=256 cpu float32 2 threads"]
    (prefix,) = [t for _, t in tables if "prefix" in set(t["method"])]
    assert prefix.set_index("method").loc["prefix", "speedup"] == pytest.approx(3.0)  # over its own none only


def test_a_speedup_without_both_throughputs_is_not_shown(tmp_path):
    """A baseline throughput of 0 or a CSV without the column (hand-made, older): no speedup (shown as
    "–"), not a crash."""
    rows = [run_row("none", 10.0, 1.0, throughput_all_tok_s="0"), run_row("prefix", 30.0, 3.2)]
    speedups = table_of(write_csv(tmp_path / "zero.csv", rows))["speedup"]
    assert speedups["none"] == 1.0 and math.isnan(speedups["prefix"])
    frame = pd.DataFrame([run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)]).drop(columns="throughput_all_tok_s")
    frame.to_csv(tmp_path / "missing.csv", index=False)
    speedups = table_of(tmp_path / "missing.csv")["speedup"]
    assert speedups["none"] == 1.0 and math.isnan(speedups["prefix"])


def test_latex_captions_escape_what_latex_reads_as_markup():
    text = aggregate._latex_text(r"a_b%c&d#e$f{g}\h~i^j × ±")
    assert text == (r"a\_b\%c\&d\#e\$f\{g\}\textbackslash{}h\textasciitilde{}i\textasciicircum{}j $\times$ $\pm$")


def test_a_cut_short_row_or_a_doubled_column_is_refused_not_dropped(tmp_path, capsys):
    """pandas reads a row cut short by a crash with empty cells (its status is then not ok: the run
    would vanish from the tables) and renames a second "accuracy" column "accuracy.1"."""
    csv = write_csv(tmp_path / "runs.csv", [run_row("none", 10.0, 1.0), run_row("prefix", 30.0, 3.2)])
    text = csv.read_text()
    csv.write_text(text + text.splitlines()[-1][:40] + "\n")
    line = refused(aggregate.main, [str(csv)], capsys)
    assert "runs.csv: unreadable from line 4: a row of " in line and "fix: python scripts/repair_csv.py" in line
    header, *rows = text.splitlines()
    csv.write_text("\n".join([header.replace("accuracy_stderr", "accuracy"), *rows]) + "\n")
    assert "its header names ['accuracy'] twice" in refused(aggregate.main, [str(csv)], capsys)
