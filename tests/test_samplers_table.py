"""scripts/samplers_table.py: the grid's table (speedups against low_confidence / none of the same
model) and its refusals; the grid itself is run by hand (README "Decoding")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import samplers_table  # noqa: E402


def rows(*specs) -> pd.DataFrame:
    return pd.DataFrame([dict(status="ok", model=m, decoding=d, cache=c, **{"decoding.stop_at_eos": s},
                              accuracy=a, accuracy_stderr=0.03, tokens_per_forward=t, throughput_useful_tok_s=v)
                         for m, d, c, s, a, t, v in specs])


def test_table_orders_rows_and_divides_by_the_baseline(tmp_path):
    csv = tmp_path / "grid.csv"
    rows(("tiny_llada", "wino", "none", False, 0.75, 8.0, 800.0),
         ("tiny_llada", "low_confidence", "dual", True, 0.70, 1.0, 300.0),
         ("tiny_llada", "low_confidence", "none", False, 0.76, 1.0, 200.0),
         ("tiny_dream", "low_confidence", "none", False, 0.62, 1.0, 100.0),
         ("tiny_dream", "ar", "none", False, 0.5, 1.0, 50.0)).to_csv(csv, index=False)
    lines = samplers_table.table(csv, samplers_table.DECODERS, samplers_table.CACHES).splitlines()
    assert lines[2].startswith("| tiny_dream | low_confidence | none | off | 62.0 ± 3.0 | 1.00 | 100 | 1.00× |")
    assert lines[3].endswith("| 50 | 0.50× |")
    assert [line.split(" | ")[1:4] for line in lines[4:]] == [
        ["low_confidence", "none", "off"], ["low_confidence", "dual", "on"], ["wino", "none", "off"]]
    assert lines[-1].endswith("| 800 | 4.00× |")


def test_table_takes_the_baseline_from_another_csv(tmp_path):
    """Only the asked decoders and caches, and of the baseline its rows of those decoders under the
    caches shown beside them, stop_at_eos off (the README's key-methods table)."""
    base, more = tmp_path / "base.csv", tmp_path / "more.csv"
    rows(("tiny_llada", "low_confidence", "none", False, 0.76, 1.0, 200.0),
         ("tiny_llada", "low_confidence", "none", True, 0.76, 1.2, 240.0),
         ("tiny_llada", "low_confidence", "d2cache", False, 0.70, 1.0, 600.0),
         ("tiny_llada", "wino", "none", False, 0.75, 8.0, 800.0)).to_csv(base, index=False)
    rows(("tiny_llada", "low_confidence", "dpad", False, 0.74, 1.0, 500.0),
         ("tiny_llada", "low_confidence", "elastic", False, 0.6, 1.0, 300.0)).to_csv(more, index=False)
    lines = samplers_table.table(more, ["low_confidence"], ["dpad"], base, ["none"]).splitlines()
    assert [line.split(" | ")[2:4] for line in lines[2:]] == [["none", "off"], ["dpad", "off"]]
    assert lines[-1].endswith("| 500 | 2.50× |")


def test_unknown_names_are_refused():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "samplers_table.py"), "--caches", "none,bogus",
                           "--table-only"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bogus" in done.stderr and "dpad" in done.stderr


def refusal(*args: str) -> str:
    """The one error line of a refused samplers_table.py command (exit 2, nothing run, no traceback)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "samplers_table.py"), "--decoders", "low_confidence",
                           "--caches", "none", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_bad_out_csv_and_overrides_are_refused_before_anything_runs(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    (tmp_path / "folder.csv").mkdir()
    out = str(tmp_path / "grid.csv")
    cases = [
        (["--table-only", "--out", str(tmp_path / "other.csv")], "other.csv: not a results CSV of run.py (missing columns"),
        (["--table-only", "--out", str(tmp_path / "empty.csv")], "empty.csv: not a CSV (No columns to parse from file)"),
        (["--out", str(tmp_path / "folder.csv")], "folder.csv: a folder. Fix: set results_csv to a CSV file"),
        (["--out", out, "cache.kk=1"], "cache.kk: cache=none has no key 'kk'"),
        (["--out", out, "gen_length=-5"], "model=tiny_llada decoding=low_confidence cache=none gen_length=-5: "
                                          "gen_length=-5 must be an integer >= 1"),
    ]
    for args, message in cases:
        assert message in refusal(*args), args
    assert not Path(out).exists()


def test_a_failed_run_stops_the_grid_with_its_error_line(capsys):
    fails = "import sys; print('error: gen_length=7 is bad', file=sys.stderr); print('(a hint)', file=sys.stderr); sys.exit(2)"
    with pytest.raises(SystemExit) as exit_info:
        samplers_table.run_job([sys.executable, "-c", fails])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[:2] == ["error: gen_length=7 is bad", "(a hint)"]  # passed through
    assert err[-1] == f"samplers_table.py: error: run failed (exit 2): -c {fails}: gen_length=7 is bad"


def test_table_without_a_baseline_row_is_refused(tmp_path):
    csv = tmp_path / "grid.csv"
    rows(("tiny_llada", "wino", "none", False, 0.75, 8.0, 800.0)).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"no low_confidence / none row \(stop_at_eos off\) of \['tiny_llada'\]"):
        samplers_table.table(csv, samplers_table.DECODERS, samplers_table.CACHES)
