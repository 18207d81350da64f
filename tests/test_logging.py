"""Run records and sinks: locked concurrent CSV appends, crash safety, resume keys, run dir, W&B.

Workers run in spawned processes (the way SLURM array jobs share one CSV). Heavy imports
(pandas, wandb) stay inside tests so each spawned child starts fast.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing as mp
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from dllm.logging.record import RunRecord, git_commit, new_run_id, record_key
from dllm.logging.sinks import (
    ResultsCsvError, WandbSink, append_csv, check_results_csv, existing_keys, write_run_dir,
)

SPAWN = mp.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, every folder it touches under tmp_path (nothing in $HOME, no network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        folder = tmp_path / "wandb_env" / var.lower()
        folder.mkdir(parents=True)
        monkeypatch.setenv(var, str(folder))


def make_record(**overrides) -> RunRecord:
    gen_seconds = 1 / 3  # awkward floats: the round trip through CSV and JSON must be exact
    settings = dict(
        model="tiny_llada", checkpoint="/ckpt/tiny_llada", checkpoint_revision="main", checkpoint_config_sha256="ab" * 32,
        cache="d2cache", cache_params={"rollout_p": 0.1, "sizes": [1, 2]},
        decoding="low_confidence", decoding_params={"steps": 8, "block_length": 4, "temperature": 0.0},
        task="arith", lm_eval_task="arith", code_scoring="raw", chat=True, cut_at_eos=True, cut_at_until=True, run_key="0123abcd0123abcd", n_shot=4, limit=8, batch_size=2, gen_length=8, steps=8, block_length=4, seed=0,
        device="cpu", dtype="float32", threads=2, processes=1, accuracy_metric="exact_match", accuracy=0.625, accuracy_stderr=0.1830,
        n_samples=8, useful_tokens=41, all_tokens=64, gen_seconds=gen_seconds,
        throughput_useful_tok_s=41 / gen_seconds, throughput_all_tok_s=64 / gen_seconds,
        latency_s_mean=gen_seconds / 4, latency_s_p50=0.08, latency_s_p90=0.1, nfe=32, tokens_per_forward=1.0,
        recompute_ratio=0.3, ideal_speedup=1 / 0.3, peak_mem_gb=0.25, mask_tokens_left=0, remasked_tokens=0, timing_repeats=3, attention_ratio=0.4, ideal_speedup_attention=2.0, peak_kv_gb=0.01,
        throughput_useful_tok_s_std=0.5, throughput_all_tok_s_std=0.75, status="ok",
        compile=True, compile_seconds=12.5, recompiles=3, padding_ratio=0.05,
    )
    return RunRecord(**{**settings, **overrides})


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_row_is_flat_and_ordered():
    row = make_record(experiment="table1", run_dir="outputs/x").to_row()
    names = [f.name for f in fields(RunRecord)]
    assert list(row)[:8] == names[:8]  # run_id ... model, checkpoint identity, cache
    assert list(row)[8:15] == [
        "cache.rollout_p", "cache.sizes", "decoding", "decoding.block_length", "decoding.steps",
        "decoding.temperature", "task",
    ]
    assert list(row)[-4:] == ["status", "experiment", "run_dir", "run_key"]
    assert [k for k in row if "." not in k] == [n for n in names if not n.endswith("_params") and n != "other_metrics"]
    metrics = make_record(other_metrics={"math_verify,none": 0.5, "exact_match,strict": 0.25}).to_row()
    assert [k for k in metrics if k.startswith("metrics.")] == ["metrics.exact_match,strict", "metrics.math_verify,none"]
    assert metrics["metrics.math_verify,none"] == 0.5
    assert row["cache.sizes"] == "[1, 2]"  # lists become JSON text: one CSV cell
    assert json.loads(json.dumps(row)) == row


def test_record_helpers():
    ids = [new_run_id() for _ in range(3)]
    assert len(set(ids)) == 3 and ids == sorted(ids)  # time first: sorts by start
    commit = git_commit()
    assert commit == "unknown" or len(commit.removesuffix("+dirty")) >= 7
    assert make_record(accuracy_stderr=float("nan")).to_row()["accuracy_stderr"] is None


def _append_after(path: str, row: dict, barrier) -> None:
    barrier.wait()  # all 8 hit the lock together
    append_csv(path, row)


def test_concurrent_appends_from_8_processes(tmp_path):
    path = tmp_path / "runs.csv"
    barrier = SPAWN.Barrier(8)
    rows = []
    for i in range(8):
        # a third of the workers bring a new cache param: concurrent union rewrites too
        extra = {"cache_params": {"rollout_p": 0.1, f"only_{i}": i}} if i % 3 == 0 else {}
        rows.append(make_record(seed=i, **extra).to_row())
    procs = [SPAWN.Process(target=_append_after, args=(str(path), row, barrier)) for row in rows]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    import pandas as pd

    frame = pd.read_csv(path)
    assert len(frame) == 8 and sorted(frame["seed"]) == list(range(8))
    assert set(frame.columns) == set().union(*rows)
    for row in rows:
        got = frame[frame["seed"] == row["seed"]].iloc[0]
        for key, value in row.items():
            if value is None:
                assert pd.isna(got[key])
            elif isinstance(value, (int, float)):  # pandas reads an int column with blanks as float
                assert got[key] == value, key
            else:
                assert str(got[key]) == str(value), key
        others = [c for c in frame.columns if c not in row]
        assert got[others].isna().all()  # another run's param is blank here
    assert not list(tmp_path.glob(".runs.csv.*.tmp"))


def _generate_then_append(path: str, row: dict, started) -> None:
    started.set()
    time.sleep(120)  # "generating": killed before it ever gets to append
    append_csv(path, row)


def _append_forever(path: str, row: dict, started) -> None:
    started.set()
    for i in range(10**9):
        params = {**row, "seed": i}
        if i % 7 == 3:
            params[f"cache.new_{i}"] = i  # exercises the rewrite path under SIGKILL too
        append_csv(path, params)


def _kill(target, path: Path, row: dict, after_s: float) -> None:
    started = SPAWN.Event()
    proc = SPAWN.Process(target=target, args=(str(path), row, started))
    proc.start()
    assert started.wait(60)
    time.sleep(after_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def test_killed_while_generating_leaves_no_row(tmp_path):
    path = tmp_path / "runs.csv"
    append_csv(path, make_record(seed=0).to_row())
    before = path.read_bytes()
    _kill(_generate_then_append, path, make_record(seed=1).to_row(), after_s=0.2)
    assert path.read_bytes() == before
    import pandas as pd

    assert list(pd.read_csv(path)["seed"]) == [0]


def test_killed_while_appending_leaves_whole_rows(tmp_path):
    path = tmp_path / "runs.csv"
    row = make_record().to_row()
    _kill(_append_forever, path, row, after_s=1.0)
    import pandas as pd

    frame = pd.read_csv(path)
    assert len(frame) > 3
    assert list(frame["seed"]) == list(range(len(frame)))  # no lost, merged or torn row
    assert frame[list(row)].drop(columns=["experiment", "run_dir", "gpu_name"]).notna().all().all()
    assert (frame["throughput_useful_tok_s"] == row["throughput_useful_tok_s"]).all()
    append_csv(path, {**row, "seed": -1})  # the dead writer's lock was released with it
    assert len(read_rows(path)) == len(frame) + 1


def test_new_columns_rewrite_keeps_old_rows(tmp_path):
    path = tmp_path / "runs.csv"
    first = make_record(seed=0).to_row()
    second = make_record(seed=1, cache_params={"rollout_p": 0.2, "window": 3}).to_row()
    append_csv(path, first)
    append_csv(path, second)
    append_csv(path, first | {"seed": 2})
    header = next(csv.reader(open(path)))
    assert header == list(first) + ["cache.window"]  # old order kept, new column last
    rows = read_rows(path)
    assert [r["seed"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["cache.window"] == "" and rows[0]["cache.sizes"] == "[1, 2]"
    assert rows[1]["cache.window"] == "3" and rows[1]["cache.sizes"] == ""
    assert rows[1]["cache.rollout_p"] == "0.2" and rows[2]["gen_seconds"] == repr(1 / 3)


def test_existing_keys_round_trip(tmp_path):
    """Resume reads the run_key of every ok row (the runner hashes the run's whole settings into
    it, tests/test_sweeps.py); rows from before that column are keyed by their settings columns."""
    path = tmp_path / "runs.csv"
    assert existing_keys(path) == set()
    done = make_record(seed=0, run_key="a" * 16)
    append_csv(path, done.to_row())
    append_csv(path, make_record(seed=1, run_key="b" * 16, status="failed").to_row())
    # another run brings a column the first row lacks: the keys read back must not change
    append_csv(path, make_record(seed=2, run_key="c" * 16, cache_params={"rollout_p": 0.1, "window": 3}).to_row())
    legacy = {k: v for k, v in make_record(seed=3).to_row().items() if k != "run_key"}
    append_csv(path, legacy)
    keys = existing_keys(path)
    assert keys == {"a" * 16, "c" * 16, record_key(legacy)}
    assert record_key(legacy).startswith("legacy-")  # never equal to a run_key: such runs run again
    again = make_record(seed=0, run_key="a" * 16, accuracy=0.0, gen_seconds=9.0)
    assert again.run_id != done.run_id and record_key(again.to_row()) in keys
    assert record_key(make_record(seed=1, run_key="b" * 16).to_row()) not in keys  # failed: run it again
    assert record_key({**legacy, "limit": ""}) != record_key(legacy)  # a legacy key still covers its columns


def test_run_dir_files_match_csv_row(tmp_path):
    import yaml

    record = make_record(run_dir=str(tmp_path / "run"))
    samples = [
        {"prompt": "1+1=", "generation": "2", "target": "2", "correct": True, "useful_tokens": 2, "seconds": 0.1},
        {"prompt": "2+2=", "generation": "5 ünï", "target": "4", "correct": False, "useful_tokens": 8, "seconds": 0.1},
    ]
    config_yaml = "model:\n  name: tiny_llada\ncache:\n  name: d2cache\n"
    write_run_dir(record.run_dir, record, samples, config_yaml)
    append_csv(tmp_path / "runs.csv", record.to_row())
    run = Path(record.run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == record.to_row()
    assert [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()] == samples
    assert yaml.safe_load((run / "config.yaml").read_text()) == {"model": {"name": "tiny_llada"}, "cache": {"name": "d2cache"}}
    [csv_row] = read_rows(tmp_path / "runs.csv")
    assert list(csv_row) == list(metrics)
    for key, value in metrics.items():
        assert csv_row[key] == ("" if value is None else str(value)), key
    assert float(csv_row["throughput_useful_tok_s"]) == metrics["throughput_useful_tok_s"]
    assert not list(run.glob(".*.tmp"))


def read_wandb_log(path: Path) -> list:
    """Records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of
    crc32 / length / type-framed chunks after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_summary_matches_csv(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    record = make_record(run_dir=str(tmp_path / "run"), experiment="table1")
    samples = [
        {"prompt": "1+1=", "generation": "2", "target": "2", "correct": True, "useful_tokens": 2, "seconds": 0.1},
        {"prompt": "2+2=", "generation": "5", "target": "4", "correct": False, "useful_tokens": 8, "seconds": 0.1},
    ]
    config = {"model": {"name": "tiny_llada"}, "cache": {"name": "d2cache", "rollout_p": 0.1}, "seed": 0}
    folder = WandbSink("dllm-tests", group="g", tags=["test"], run_dir=record.run_dir).log(record, samples, config)
    append_csv(tmp_path / "runs.csv", record.to_row())
    [csv_row] = read_rows(tmp_path / "runs.csv")

    assert folder.parent == Path(record.run_dir) / "wandb" and folder.name.startswith("offline-run-")
    # wandb 0.31 (wandb-core) writes no files/wandb-summary.json offline: read the transaction log
    [log] = folder.glob("run-*.wandb")
    summary, run = {}, None
    for rec in read_wandb_log(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "summary":
            for item in rec.summary.update:
                summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    assert run.display_name == record.run_id and run.run_group == "g" and list(run.tags) == ["test"]
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: logged_config[k] for k in config} == config
    for key in ("accuracy", "throughput_useful_tok_s", "throughput_all_tok_s", "latency_s_p90", "recompute_ratio"):
        assert summary[key] == float(csv_row[key]), key
    row = record.to_row()
    assert {k: summary[k] for k in row if row[k] is not None} == {k: v for k, v in row.items() if v is not None}

    [table] = (folder / "files" / "media" / "table").glob("samples_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == list(samples[0])
    assert [r[1] for r in table["data"]] == ["2", "5"]
    assert not any(home.iterdir())  # nothing went to the home folder


def test_wandb_modes(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert WandbSink("p", run_dir=tmp_path).mode == "offline"  # never online by accident
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sink = WandbSink("p", run_dir=tmp_path / "run")
    assert sink.mode == "disabled"
    assert sink.log(make_record(), [], {"seed": 0}) is None
    assert not (tmp_path / "run" / "wandb").exists()
    with pytest.raises(ValueError, match="allowed: online, offline, disabled"):
        WandbSink("p", mode="dryrun")


# --- A results CSV that cannot be appended to safely is refused, never silently merged or replaced ---


def csv_line(path: Path, **overrides) -> str:
    """One row as append_csv would write it under the file's header."""
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=header, lineterminator="\n").writerow(make_record(**overrides).to_row())
    return buf.getvalue()


def repair(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/repair_csv.py", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def assert_refused(path: Path, *words: str) -> None:
    """check_results_csv and append_csv both refuse with one line naming the file; the file stays."""
    before, mode = path.read_bytes(), path.stat().st_mode
    with pytest.raises(ResultsCsvError) as error:
        check_results_csv(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    with pytest.raises(ResultsCsvError, match=path.name):
        append_csv(path, make_record(seed=99).to_row())
    assert path.read_bytes() == before and path.stat().st_mode == mode


def test_absent_or_empty_csv_is_fine(tmp_path):
    path = tmp_path / "new" / "runs.csv"
    check_results_csv(path)  # a folder that can be made: made by the append, so a refused run leaves none
    assert not path.parent.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ResultsCsvError, match=r"cannot create its folder \(.*file is a file\)"):
        check_results_csv(tmp_path / "file" / "sub" / "runs.csv")
    path.parent.mkdir()
    path.write_bytes(b"")
    check_results_csv(path)
    append_csv(path, make_record().to_row())
    check_results_csv(path)
    assert len(read_rows(path)) == 1


@pytest.mark.parametrize("corruption", ["cut_inside_quotes", "extra_cells", "not_utf8"])
def test_unreadable_tail_is_refused_then_moved_aside(tmp_path, corruption):
    path = tmp_path / "runs.csv"
    for seed in (0, 1):
        append_csv(path, make_record(seed=seed).to_row())
    good = path.read_bytes()
    line = csv_line(path, seed=2)
    if corruption == "cut_inside_quotes":  # a crash or a short copy inside '"[1, 2]"' (cache.sizes)
        tail = line[: line.index('"[1, 2]"') + 3].encode()
    elif corruption == "extra_cells":  # then a good row: it is moved aside too (all from the first bad row)
        tail = (line.rstrip("\n") + ",extra\n" + csv_line(path, seed=3)).encode()
    else:
        tail = line.encode().replace(b"tiny_llada", b"tiny\xffllada", 1)
    path.write_bytes(good + tail)
    assert_refused(path, "unreadable from line 4", "repair_csv.py", "runs.csv.rejected")

    rejected = path.with_name("runs.csv.rejected")
    rejected.write_bytes(b"earlier\n")  # an earlier repair's tail: appended to, never replaced
    result = repair(path)
    assert result.returncode == 0, result.stderr
    assert "(rows: 2)" in result.stdout and f"{len(tail)} bytes from there on moved" in result.stdout
    assert path.read_bytes() == good and rejected.read_bytes() == b"earlier\n" + tail
    check_results_csv(path)
    import pandas as pd

    assert list(pd.read_csv(path)["seed"]) == [0, 1]
    append_csv(path, make_record(seed=9).to_row())
    assert list(pd.read_csv(path)["seed"]) == [0, 1, 9]
    assert "nothing to repair" in repair(path).stdout


def test_repair_appends_a_record_left_in_its_run_folder(tmp_path):
    """A run that finished while its CSV was unreadable: after the repair, its metrics.json joins
    the CSV (once: an ok row with its key already there is not appended again)."""
    path = tmp_path / "runs.csv"
    append_csv(path, make_record(seed=0, run_key="a" * 16).to_row())
    good = path.read_bytes()
    path.write_bytes(good + b'x,"unclosed\n')
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, make_record(seed=1, run_key="b" * 16), [], "")
    append = [sys.executable, "scripts/repair_csv.py", str(path), "--append", str(run_dir)]
    result = subprocess.run(append, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "appended the record" in result.stdout and [r["seed"] for r in read_rows(path)] == ["0", "1"]
    again = subprocess.run(append, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "already has an ok row" in again.stdout and len(read_rows(path)) == 2
    missing = subprocess.run([*append[:-1], str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    partial, extra = tmp_path / "partial", tmp_path / "extra"
    partial.mkdir()
    (partial / "metrics.json").write_text(json.dumps({"run_key": "zz3", "status": "ok"}))
    extra.mkdir()
    (extra / "metrics.json").write_text(json.dumps({**make_record(run_key="c" * 16).to_row(), "mine": 1}))
    typed = {}
    for key, value in (("accuracy", "abc"), ("n_shot", 1.5), ("compile", "yes"), ("model", 5)):  # hand-edited values
        typed[key] = tmp_path / f"typed_{key}"
        typed[key].mkdir()
        (typed[key] / "metrics.json").write_text(json.dumps({**make_record(run_key="d" * 16).to_row(), key: value}))
    for folder, message in ((partial, "is not a whole run record (no run_id, model, cache, decoding, task)"),
                            (extra, "has columns no run record has: ['mine']"),
                            (typed["accuracy"], "accuracy='abc' (allowed: a number or null)"),
                            (typed["n_shot"], "n_shot=1.5 (allowed: an integer or null)"),
                            (typed["compile"], "compile='yes' (allowed: true or false or null)"),
                            (typed["model"], "model=5 (allowed: a text)")):
        refused = subprocess.run([*append[:-1], str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert len(read_rows(path)) == 2


def test_foreign_csv_is_refused(tmp_path):
    ours = make_record().to_row()
    files = {
        "scores.csv": "name,score\nx,1\n",
        "semicolon.csv": ";".join(ours) + "\n" + ";".join(str(v) for v in ours.values()) + "\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        result = repair(path)
        assert result.returncode == 2 and "not a results CSV of this project" in result.stderr
        assert path.read_text() == text and not path.with_name(f"{name}.rejected").exists()
        assert not path.with_name(f"{name}.lock").exists()  # nothing made beside another tool's file
        assert_refused(path, "not a results CSV of this project", "run_id")


def test_write_protected_csv_is_refused(tmp_path):
    path = tmp_path / "runs.csv"
    append_csv(path, make_record().to_row())
    path.chmod(0o444)  # tests may run as root, which os.access lets write anyway
    assert_refused(path, "write-protected", "0o444")
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_append_keeps_the_file_mode(tmp_path):
    path = tmp_path / "runs.csv"
    append_csv(path, make_record(seed=0).to_row())
    path.chmod(0o640)
    append_csv(path, make_record(seed=1).to_row())  # plain append
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    append_csv(path, make_record(seed=2, cache_params={"window": 3}).to_row())  # rewrite with a new column
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [r["seed"] for r in read_rows(path)] == ["0", "1", "2"]


def test_append_removes_dead_writers_temp_files(tmp_path):
    path = tmp_path / "runs.csv"
    append_csv(path, make_record(seed=0).to_row())
    dead = tmp_path / ".runs.csv.deadbeef.tmp"
    dead.write_text("half a file")
    unrelated = [".runs.csv.backup.tmp", ".other.csv.deadbeef.tmp", "runs.csv.deadbeef.tmp", ".runs.csv.deadbeef.tmp.keep"]
    for name in unrelated:
        (tmp_path / name).write_text("keep")
    append_csv(path, make_record(seed=1).to_row())
    assert not dead.exists()
    assert all((tmp_path / name).read_text() == "keep" for name in unrelated)
    assert len(read_rows(path)) == 2
