"""scripts/bench.py runs end to end on the smoke preset and writes the documented JSON rows."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import torch  # noqa: E402

from dllm.models.packed import can_pack  # noqa: E402

KEYS = {"method", "decoding", "tokens_per_s", "speedup", "ideal_speedup", "efficiency", "attainable_speedup",
        "attainable_efficiency", "peak_mem_gb", "agreement"}
CORE = {"dkv_decode", "dkv_greedy", "d2cache"}


def run_bench(*extra: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "smoke", "--threads", "1", "--repeats", "2", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )


WAVE1 = "dkv_decode,dkv_greedy,d2cache,prefix,dual,dllm_cache"


def test_bench_smoke_writes_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--json", str(out), "--methods", WAVE1, "--samplers", "", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert row["repeats"] == 2
        assert row["tokens_per_s"] > 0 and row["ideal_speedup"] >= 1 and 0 <= row["agreement"] <= 1
        assert math.isclose(row["efficiency"], row["speedup"] / row["ideal_speedup"], rel_tol=1e-9)
        assert math.isclose(row["attainable_efficiency"], row["speedup"] / row["attainable_speedup"], rel_tol=1e-9)
        # Same nfe as none (one token per step) and fewer rows: a fixed cost per forward can only
        # pull the attainable speedup below the linear-layer bound, never above it or below 1.
        assert row["nfe"] == 32 and 1 <= row["attainable_speedup"] <= row["ideal_speedup"] * (1 + 1e-9)
        # bare forward times from 1 to all P + G = 48 active rows, and their affine fit
        assert set(row["bare_forward_ms"]) == {"1", "8", "32", "48"} and min(row["bare_forward_ms"].values()) > 0
        assert row["forward_fixed_ms"] >= 0 and row["forward_per_row_ms"] >= 0
        # the layers' GEMMs alone at the same row counts; their fit caps the efficiency (same nfe: at most 1)
        assert set(row["bare_gemm_ms"]) == set(row["bare_forward_ms"]) and min(row["bare_gemm_ms"].values()) > 0
        assert math.isclose(row["gemm_efficiency_cap"], row["gemm_bound_speedup"] / row["ideal_speedup"], rel_tol=1e-9)
        assert 1 <= row["gemm_bound_speedup"] and row["gemm_efficiency_cap"] <= 1 + 1e-9
    # the memory floor under the fixed cost: measured once per batch size, on every row
    assert len({r["weight_read_ms"] for r in rows}) == 1 and rows[0]["weight_read_ms"] > 0
    methods = [r["method"] for r in rows]
    assert CORE <= set(methods)
    # one none per decoding, each compared method sits with the none of its own decoding
    nones = {r["decoding"]: r for r in rows if r["method"] == "none"}
    assert len(nones) == sum(m == "none" for m in methods) == 3
    for row in rows:
        assert row["decoding"] in nones
        if row["method"] == "none":
            assert row["speedup"] == 1 and row["agreement"] == 1 and row["ideal_speedup"] == 1
            assert row["attainable_speedup"] == 1
        else:
            assert row["ideal_speedup"] > 1
        # two rounds: true medians (means of the two), the speedup of each round against its own none
        none_rounds, rounds = nones[row["decoding"]]["round_wall_s"], row["round_wall_s"]
        assert math.isclose(row["wall_s"], sum(rounds) / 2, rel_tol=1e-9)
        assert math.isclose(row["speedup"], sum(n / r for n, r in zip(none_rounds, rounds)) / 2, rel_tol=1e-9)
    assert "low_confidence" in next(r for r in rows if r["method"] == "dkv_decode")["decoding"]
    assert "random" in next(r for r in rows if r["method"] == "dkv_greedy")["decoding"]
    assert "certainty_prior" in next(r for r in rows if r["method"] == "d2cache")["decoding"]
    assert "speedup" in proc.stdout and "| method" in proc.stdout  # the table is printed


def test_bench_runs_samplers_and_key_methods_beside_none(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench("--json", str(out), "--methods", "sparse_dllm,streaming,dpad,elastic", "--samplers", "ar,wino",
                     tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["method"], r["decoding"].split(",")[0]): r for r in json.loads(out.read_text())}
    # the samplers run with cache=none and are compared with none under low_confidence (blocks of 32); each row
    # records the blocks that ran (wino's 128 is the smoke preset's whole generation, 32)
    for sampler in ("ar", "wino"):
        row = rows[("none", sampler)]
        assert row["ideal_speedup"] == 1 and row["speedup"] > 0 and row["decoding_params"] == {"block_length": 32}
    assert rows[("none", "low_confidence")]["speedup"] == 1
    assert rows[("none", "ar")]["agreement"] < 1 or rows[("none", "ar")]["nfe"] == 32
    # every method with its paper decoding; the attention-aware bound and the attended K/V are reported
    for method in ("sparse_dllm", "streaming", "dpad", "elastic"):
        row = next(r for (m, _), r in rows.items() if m == method)
        assert row["ideal_speedup_attention"] > 0 and row["peak_kv_gb"] > 0
    # evicted keys save attention beyond the rows: the bound with attention exceeds the linear one
    sparse = rows[("sparse_dllm", "low_confidence")]
    assert sparse["ideal_speedup_attention"] > sparse["ideal_speedup"]
    assert ("none", "threshold") in rows  # Elastic-Cache's threshold decoding gets its own none


def test_bench_rejects_unknown_sampler(tmp_path):
    proc = run_bench("--samplers", "ar,bogus", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "wino" in proc.stderr


def test_bench_rejects_unknown_method(tmp_path):
    proc = run_bench("--methods", "dkv_decode,bogus", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr and "d2cache" in proc.stderr


def test_forward_cost_fit_recovers_an_affine_cost_and_never_goes_negative():
    exact = bench.ForwardCost.fit({1: 10.5, 32: 26.0, 512: 266.0})
    assert math.isclose(exact.fixed_ms, 10.0) and math.isclose(exact.per_row_ms, 0.5)
    # noise that makes more rows look cheaper gives a flat cost, not a negative one
    flat = bench.ForwardCost.fit({1: 5.0, 8: 4.0})
    assert flat.per_row_ms == 0 and math.isclose(flat.fixed_ms, 4.5)
    steep = bench.ForwardCost.fit({1: 0.1, 100: 100.0, 200: 220.0})
    assert steep.fixed_ms == 0 and steep.per_row_ms > 0


def test_attainable_speedup_is_the_modelled_time_ratio():
    from dllm.decoding.loop import GenerationOutput

    def run(nfe, rows_per_forward):
        layers = 4
        return GenerationOutput(tokens=None, nfe=nfe, active_token_layers=nfe * rows_per_forward * layers,
                                total_token_layers=nfe * 512 * layers, seconds=1.0, peak_mem_gb=0.0)

    cost = bench.ForwardCost(fixed_ms=20.0, per_row_ms=0.5)
    full, cached = run(256, 512), run(256, 32)
    assert math.isclose(cost.run_ms(full, 4, 1), 256 * (20 + 256))
    attainable = cost.run_ms(full, 4, 1) / cost.run_ms(cached, 4, 1)
    assert math.isclose(attainable, 276 / 36) and attainable < cached.ideal_speedup == 16
    # without a fixed cost the attainable speedup is the linear-layer bound
    assert math.isclose(bench.ForwardCost(0.0, 0.5).run_ms(full, 4, 1) / bench.ForwardCost(0.0, 0.5).run_ms(cached, 4, 1),
                        cached.ideal_speedup)


def test_gemm_timing_calls_every_linear_map_of_the_layers_and_skips_moe(monkeypatch):
    from dataclasses import replace

    args = bench.parse_args(["--preset", "smoke", "--prompt-length", "8", "--gen-length", "8"])
    args.batch_size = 2  # as run_batch sets it per size
    margs = replace(bench.model_args(args), n_layers=2)
    net = bench.build_model(margs, torch.device("cpu"), torch.float32, seed=0)
    called = []
    for name, module in net.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, inputs, out, name=name: called.append((name, inputs[0].shape)))
    ms = bench.bare_gemm_ms(net, args, repeats=1)
    assert set(ms) == {1, 8, 16} and min(ms.values()) > 0
    linears = sorted(n for n, m in net.layers.named_modules() if isinstance(m, torch.nn.Linear))
    assert len(linears) == 2 * 7 and sorted({n for n, _ in called}) == linears
    assert len(called) == len(linears) * 3 * 2  # every row count, in the warm-up round and the timed one
    assert {shape[:2] for _, shape in called} == {(2, 1), (2, 8), (2, 16)}
    moe = replace(margs, n_experts=4, n_experts_per_token=2)
    assert bench.bare_gemm_ms(bench.build_model(moe, torch.device("cpu"), torch.float32, seed=0), args) is None


def test_repeats_run_in_interleaved_rounds(monkeypatch):
    calls = []
    real = bench.generate_once

    def recording(net, prompts, method, decoding, dparams, args, gen_length=None):
        calls.append((method, gen_length))
        return real(net, prompts, method, decoding, dparams, args, gen_length)

    monkeypatch.setattr(bench, "generate_once", recording)
    rows = bench.main(["--preset", "smoke", "--repeats", "3", "--methods", "dual,prefix", "--samplers", ""])
    timed = [method for method, gen_length in calls if gen_length is None]
    assert [method for method, gen_length in calls if gen_length is not None] == ["none", "dual", "prefix"]  # warm-ups
    assert timed == ["none", "dual", "prefix"] * 3
    assert [r["method"] for r in rows] == ["none", "dual", "prefix"] and all(r["repeats"] == 3 for r in rows)


def test_dense_weights_flag_keeps_torch_linear_layers(monkeypatch):
    """--dense-weights runs every generation on nn.Linear; by default they run on prepacked weights."""
    dense_layers = []
    real = bench.generate_once

    def recording(net, *args, **kwargs):
        dense_layers.append(any(isinstance(m, torch.nn.Linear) for m in net.modules()))
        return real(net, *args, **kwargs)

    monkeypatch.setattr(bench, "generate_once", recording)
    rows = bench.main(["--preset", "smoke", "--methods", "dual", "--dense-weights", "--samplers", ""])
    assert all(dense_layers) and all(r["packed_weights"] is False for r in rows)
    if can_pack(torch.device("cpu"), torch.float32):
        dense_layers.clear()
        rows = bench.main(["--preset", "smoke", "--methods", "dual", "--samplers", ""])
        assert not any(dense_layers) and all(r["packed_weights"] is True for r in rows)


# ----------------------------------------------------------------------------------------------- batch sweeps
@pytest.fixture(scope="module")
def batch_sweep(tmp_path_factory) -> Path:
    """The smoke preset at batch sizes 1 and 2 (given out of order): a cache method under each of two
    decodings and a sampler, so every kind of row is there."""
    out = tmp_path_factory.mktemp("batch") / "bench.json"
    bench.main(["--preset", "smoke", "--batch-sizes", "2,1", "--methods", "dual,d2cache", "--samplers", "ar",
                "--json", str(out)])
    return out


def test_batch_sizes_compare_every_method_with_none_at_each_size(batch_sweep):
    rows = json.loads(batch_sweep.read_text())
    assert [r["batch_size"] for r in rows] == [1] * 5 + [2] * 5  # smallest first
    for b in (1, 2):
        at = {(r["method"], r["decoding"].split(",")[0]): r for r in rows if r["batch_size"] == b}
        assert set(at) == {("none", "low_confidence"), ("dual", "low_confidence"), ("none", "ar"),
                           ("none", "certainty_prior"), ("d2cache", "certainty_prior")}
        for row in at.values():
            assert KEYS <= set(row) and row["speedup"] > 0
            assert math.isclose(row["tokens_per_s"], b * row["gen_length"] / row["wall_s"], rel_tol=1e-9)
            assert math.isclose(row["peak_mem_gb_per_row"], row["peak_mem_gb"] / b, rel_tol=1e-9)
            # the none it is compared with ran at the same batch size: its own row, at b
            assert ("none", row["none_decoding"].split(",")[0]) in at
        for base in ("low_confidence", "certainty_prior"):
            none = at[("none", base)]
            assert none["speedup"] == 1 and none["none_decoding"] == none["decoding"]
        assert at[("none", "ar")]["none_decoding"] == at[("none", "low_confidence")]["decoding"]
        assert at[("dual", "low_confidence")]["ideal_speedup"] > 1


def test_batch_size_options():
    assert bench.parse_args(["--preset", "smoke"]).batch_sizes == [1]
    assert bench.parse_args(["--preset", "smoke", "--batch-size", "3"]).batch_sizes == [3]
    assert bench.parse_args(["--preset", "smoke", "--batch-sizes", "4, 1,4"]).batch_sizes == [1, 4]
    for bad in (["--batch-sizes", "1,x"], ["--batch-sizes", "0,2"], ["--batch-size", "0"], ["--batch-sizes", ","],
                ["--batch-size", "2", "--batch-sizes", "1,2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--preset", "smoke", *bad])


@pytest.mark.parametrize("bad, message", [
    # a decoding setting the timed run refuses, which a 32-token warm-up would not have shown
    (["--methods", "prefix", "--gen-length", "40"], "gen_length=40 is not divisible by block_length=32"),
    (["--methods", "", "--samplers", "ar", "--steps", "7"],  # named as the bench's flags set it
     "--steps=7 --gen-length=32: cache=none decoding=ar: decoding.steps=7 must equal gen_length=32"),
    (["--gen-length", "64", "--steps", "3"], "steps=3 is not divisible by the number of blocks"),
    (["--steps", "100"], "steps per block (100) exceed block_length=32"),
    (["--steps", "-1"], "--steps=-1 must be >= 1"), (["--threads", "0"], "--threads=0 must be from 1 to"),
    (["--threads", "100000"], "--threads=100000 must be from 1 to"),
    (["--seed", "-1"], "argument --seed: -1 must be from 0 to 4294967295"),
    (["--seed", "18446744073709551616"], "argument --seed: 18446744073709551616 must be from 0 to 4294967295"),
    (["--device", "foo"], "--device='foo'"), (["--compile", "--compile-mode", "foo"], "invalid choice: 'foo'"),
    (["--json", "."], "--json=.: not a file path in a folder"),
    (["--json", ""], "--json='': give a file to write the rows to"),
    (["--json", "/proc/nope/x.json"], "--json /proc/nope: cannot make the folder"),
    (["--methods", "", "--samplers", ""], "nothing to compare with none"),
    (["--preset", "block_smoke", "--samplers", "foo"], "--samplers: unknown ['foo']"),
    (["--preset", "block_smoke", "--samplers", "wino"], "the samplers decode bidirectional models; --preset block_smoke"),
    # a block-diffusion decoder's steps are per block, the preset's: --steps would be ignored (and recorded)
    (["--preset", "block_smoke", "--steps", "999"], "--steps=999: --preset block_smoke decodes with block_diffusion "
                                                    "on the preset's own schedule per block (block_length=4, steps=4"),
    (["--family", "dream", "--samplers", "wino"], "--samplers wino: WINO decodes LLaDA-family models only"),
    (["--compile-mode", "default"], "--compile-mode default applies to --compile runs"),
    # longer than the real model's context: hours of attention over positions it never sees
    (["--prompt-length", "100000"], "100032 tokens exceed the context of --preset smoke (llada-shaped; allowed: a "
                                    "total of at most 4096)"),
    (["--family", "dream", "--gen-length", "1048576"], "allowed: a total of at most 4096"),
    (["--preset", "moe_cpu", "--prompt-length", "7937"], "(llada_moe-shaped; allowed: a total of at most 8192)"),
])
def test_bad_settings_are_refused_before_a_model_is_built(capsys, monkeypatch, bad, message):
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--preset", "smoke", *bad])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "mps", "cpu:3", "cuda:99", "foo"])
def test_devices_this_machine_lacks_are_refused_in_one_line(tmp_path, capsys, monkeypatch, device):
    """torch.device takes meta, mps, cpu:3, cuda:99: as in run.py (resolve_device), only a device this
    machine has runs, and the refusal names the value and the allowed ones, before a model is built or
    the --json written."""
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--preset", "smoke", "--device", device, "--json", str(out)])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == "" and "Traceback" not in captured.err
    line = captured.err.strip().splitlines()[-1]
    assert f": error: --device={device!r} (allowed here: ['auto', 'cpu'" in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_json_path_that_is_no_regular_file_is_refused(tmp_path, capsys, monkeypatch):
    """--json /dev/null (or a pipe): write_atomic's os.replace would, as root, put a regular file in
    place of the device node; refused first, and write_atomic itself refuses too."""
    from dllm.atomic import write_atomic

    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--preset", "smoke", "--json", str(pipe)])
    assert exit_.value.code == 2 and "--json=" in capsys.readouterr().err and not pipe.is_file()
    with pytest.raises(ValueError, match="is not a regular file"):
        write_atomic(pipe, "rows")
    assert pipe.exists() and not pipe.is_file()


def test_auto_and_cpu_devices_are_accepted():
    assert bench.parse_args(["--preset", "smoke", "--device", "cpu"]).device == torch.device("cpu")
    assert bench.parse_args(["--preset", "smoke", "--device", "auto"]).device == bench.parse_args(["--preset", "smoke"]).device


def test_lengths_up_to_the_preset_context_are_accepted():
    assert bench.parse_args(["--preset", "smoke", "--prompt-length", "4064"]).prompt_length == 4064
    assert bench.parse_args(["--preset", "moe_cpu", "--prompt-length", "7936"]).prompt_length == 7936


def test_methods_run_once_each_and_empty_means_none():
    assert bench.parse_args(["--preset", "smoke", "--methods", "dual,prefix,dual,none"]).methods == ["dual", "prefix"]
    assert bench.parse_args(["--preset", "smoke", "--methods", "", "--samplers", "ar"]).methods == []


def test_batch_sweep_keeps_the_sizes_done_when_a_later_one_fails(tmp_path, monkeypatch):
    real = bench.generate_once

    def out_of_memory_at_2(net, prompts, *args, **kwargs):
        if len(prompts) == 2:
            raise RuntimeError("out of memory")
        return real(net, prompts, *args, **kwargs)

    monkeypatch.setattr(bench, "generate_once", out_of_memory_at_2)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match="batch 2"):  # the warm-up fails: none at 2 is reported, not compared
        bench.main(["--preset", "smoke", "--batch-sizes", "1,2", "--methods", "dual", "--samplers", "",
                    "--json", str(out)])
    assert {r["batch_size"] for r in json.loads(out.read_text())} == {1}


def test_time_budget_starts_no_further_batch_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--preset", "smoke", "--batch-sizes", "1,2,4", "--methods", "dual", "--samplers", "",
                       "--time-budget", "0", "--json", str(out)])
    assert {r["batch_size"] for r in rows} == {1}  # the first size always runs
    assert {r["batch_size"] for r in json.loads(out.read_text())} == {1}
    assert "time budget of 0s spent: batch sizes [2, 4] not run" in capsys.readouterr().out
    assert {r["batch_size"] for r in bench.main(["--preset", "smoke", "--batch-sizes", "1,2", "--methods", "dual",
                                                 "--samplers", "", "--time-budget", "1e6"])} == {1, 2}
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--preset", "smoke", "--time-budget", bad])


def test_batch_scaling_plot(batch_sweep, tmp_path, drawn_figures):
    """One line per cache method in both panels, none under each decoding in the throughput panel
    only, no sampler; both panels on the measured batch sizes."""
    import plot

    drawn = drawn_figures
    assert plot.main(["--bench-json", str(batch_sweep), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "batch_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "batch_scaling.pdf").stat().st_size > 1000
    speed_ax, rate_ax = drawn["batch_scaling"].axes
    assert {line.get_label() for line in speed_ax.get_lines() if not line.get_label().startswith("_")} == {"dual", "d2cache"}
    assert {line.get_label() for line in rate_ax.get_lines()} == {
        "dual", "d2cache", "none (low_confidence)", "none (certainty_prior)"}
    for ax in (speed_ax, rate_ax):
        assert list(ax.get_xticks()) == [1, 2] and ax.get_xscale() == "log"


def test_block_diffusion_preset_runs_the_exact_prefix_cache_beside_none():
    """A block-diffusion preset: its own decoder, none / prefix / dual only; the exact prefix cache
    generates none's tokens with fewer token-layers."""
    rows = bench.main(["--preset", "block_smoke", "--batch-sizes", "1,2"])
    assert [(r["batch_size"], r["method"]) for r in rows] == [(b, m) for b in (1, 2) for m in ("none", "prefix", "dual")]
    for row in rows:
        assert row["decoding"].startswith("block_diffusion,block_length=4")
        assert row["family"] == "sdar" and row["steps"] is None  # per block: in decoding_params
    prefix = [r for r in rows if r["method"] == "prefix"]
    none = [r for r in rows if r["method"] == "none"]
    assert all(r["agreement"] == 1.0 for r in prefix)
    assert all(p["recompute_ratio"] < n["recompute_ratio"] < 1 for p, n in zip(prefix, none))


def test_block_diffusion_preset_refuses_other_methods():
    with pytest.raises(SystemExit):
        bench.main(["--preset", "block_smoke", "--methods", "d2cache"])


def test_a_preset_too_large_for_the_memory_is_refused_before_it_is_built(capsys, monkeypatch):
    """--preset llada8b on a CPU machine with less memory than its float32 weights (30 GiB) stopped only
    when the kernel killed the bench; now it is refused up front (here: 16 GiB available)."""
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(bench, "available_memory", lambda device: 16 * 2**30)
    with pytest.raises(SystemExit):
        bench.main(["--preset", "llada8b", "--device", "cpu"])
    assert ("--preset llada8b: its weights take 29.9 GiB in float32 and cpu has 16.0 GiB available; run it on a GPU"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):  # --compile builds a second copy: 2 x 15.3 GiB of bfloat16 weights
        bench.main(["--preset", "sdar8b", "--device", "cpu", "--dtype", "bfloat16", "--compile"])
    assert "its weights take 30.5 GiB in bfloat16 (two copies with --compile) and cpu has 16.0 GiB" in capsys.readouterr().err
    assert bench.available_memory(torch.device("cpu")) > 0
    # a mistyped batch size: the K/V store alone would not fit (it crashed in make_prompts' allocation)
    monkeypatch.undo()
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit):
        bench.main(["--preset", "smoke", "--batch-sizes", f"1,{10**12}"])
    assert "batch size 1000000000000: the weights and K/V store take" in capsys.readouterr().err
