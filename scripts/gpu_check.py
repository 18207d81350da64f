#!/usr/bin/env python
"""One-shot GPU check: every cache method, eager and compiled, on 8B-shaped LLaDA and Dream.

Random weights built in bf16 directly on the GPU (no download): LLaDA-8B shapes (d 4096, 32 layers,
32 heads MHA, ffn 12288, vocab 126464) and Dream-7B shapes (d 3584, 28 layers, 28 heads / 4 KV
heads, ffn 18944, vocab 152064, q/k/v biases, shifted logits). For each family, mode (eager, then
compiled with ``dllm.models.compiled.compile_layers``) and batch size (1, 32), short generations
(prompt 64, gen 32, one token per step): ``none`` and every cache method with the decoding
``scripts/bench.py`` gives it (a method that refuses the family is skipped with its reason), each
run once to warm up and once timed. Then the exactness check: a method with a refresh interval, set
to refresh every step, must give ``none``'s tokens (same mode, batch and decoding)::

    scripts/gpu_check.sh                        # the GPU check, < 8 minutes; outputs/gpu_check/
    scripts/gpu_check.sh --tiny --out /tmp/gc   # the same on CPU, tiny float32 shapes, well under a minute
    scripts/gpu_check.sh --no-compile           # eager runs only

Writes ``gpu_check.json`` and ``gpu_check.md`` (GPU name, torch and CUDA versions in the header;
per run tokens/s, speedup vs none, compiled vs eager, compile seconds, recompiles, CUDA-graph skips
(0: every compiled step replayed a CUDA graph), peak memory, agreement with none, exactness). Runs
start only while ``--time-budget`` seconds have not passed since the start; the rest are listed as
not run. Exits 1 if an exactness check fails or a run errs, 2 on bad arguments, 3 on a crash.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (puts the repository on sys.path)
from dllm import seed_argument  # noqa: E402
from dllm.atomic import make_out_folder, write_atomic  # noqa: E402
from dllm.cache.base import CacheMethod, build_cache, cache_names  # noqa: E402
from dllm.decoding.loop import GenerationOutput, generate  # noqa: E402
from dllm.models.compiled import check_torch_version, compile_layers  # noqa: E402
from dllm.models.tiny import BASE_ARGS  # noqa: E402
from dllm.models.transformer import ModelArgs, Transformer  # noqa: E402

FAMILIES = ("llada", "dream")
# Dream-v0-7B (Qwen2.5-7B) shapes over bench.py's llada8b preset with --family dream (q/k/v biases,
# shifted logits, RoPE theta 1e6); 151666 is Dream's [MASK] id.
DREAM_7B = dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064,
                mask_token_id=151666)
# --tiny: bench.py's smoke preset (d 64, 2 layers, 4 heads, 2 KV heads), LLaDA made MHA as the real one is.
TINY_KV_HEADS = {"llada": 4, "dream": 2}

# The cache parameters that make a method recompute everything every step (tests/test_cache.py,
# test_fast_dllm.py, test_dllm_cache.py, test_sparse_dllm.py check them token for token on CPU).
# elastic, streaming and dpad have no such interval: they are not checked.
REFRESH_EVERY_STEP = {
    "dkv_decode": dict(refresh_interval=1),
    "dkv_greedy": dict(refresh_interval=1),
    "d2cache": dict(refresh_interval=1),
    "prefix": dict(refresh_interval=1),
    "dual": dict(refresh_interval=1),
    "dllm_cache": dict(prompt_interval=1, response_interval=1),
    "sparse_dllm": dict(update_interval=1),
}
# Methods whose refreshing forwards run through a LayerHook, which stays eager under compile_layers:
# compiled, they are compared with the eager none (the same kernels), not the compiled one.
HOOKED = {"dllm_cache"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every run of one check shares."""

    device: torch.device
    dtype: torch.dtype
    prompt_length: int
    gen_length: int
    seed: int


class Budget:
    """Runs start only before the deadline; once it has passed, the rest are reported as not run."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() > self.seconds


def listed(ap: argparse.ArgumentParser, flag: str, text: str, allowed) -> list[str]:
    """A comma-separated list of names from ``allowed``: at least one; a name given twice runs once."""
    names = bench.names_of(text)
    if not names:  # an empty check would pass with nothing run
        ap.error(f"{flag}={text!r}: give at least one of {list(allowed)}")
    if bad := [name for name in names if name not in allowed]:
        ap.error(f"{flag}: unknown {bad} (allowed: {list(allowed)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="folder for gpu_check.json / .md")
    ap.add_argument("--tiny", action="store_true", help="tiny float32 shapes on CPU (what CI runs)")
    ap.add_argument("--no-compile", action="store_true", help="eager runs only")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help="seconds after which no further run starts (default 420; 0 starts none)")
    ap.add_argument("--methods", help="comma-separated cache methods (default: every registered one but none); "
                                      "in this list and the next two a value given twice runs once")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: llada,dream)")
    ap.add_argument("--batch-sizes", help="comma-separated (default 1,32; --tiny: 1,4)")
    ap.add_argument("--prompt-length", type=int, help="default 64 (--tiny: 16)")
    ap.add_argument("--gen-length", type=int, help="default 32 (--tiny: 16); at most, or a multiple of, the "
                                                   "block length of the methods' decodings (32)")
    ap.add_argument("--seed", type=seed_argument, default=0)
    args = ap.parse_args(argv)
    names = [m for m in cache_names() if m != "none"]
    args.methods = names if args.methods is None else listed(ap, "--methods", args.methods, names)
    args.families = listed(ap, "--families", args.families, FAMILIES)
    # --tiny keeps CI's run well under a minute on 2 cores: the denoising loop's per-step cost, not
    # the tiny model, is what a CPU run spends its time on.
    for key, default in (("prompt_length", 16 if args.tiny else 64), ("gen_length", 16 if args.tiny else 32)):
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    # Within the context of the real models whose shapes are built (LLaDA-8B: 4096): longer, it times
    # positions they never see, and an 8B model's store and attention over them may run for hours.
    context = min(BASE_ARGS[family]["max_seq_len"] for family in args.families)
    if args.prompt_length + args.gen_length > context:
        ap.error(f"--prompt-length {args.prompt_length} + --gen-length {args.gen_length} = "
                 f"{args.prompt_length + args.gen_length} tokens exceed the context of --families "
                 f"{','.join(args.families)} (allowed: a total of at most {context})")
    # Every method's decoder and cache, as its runs build them (one token per step), else every run of it errs.
    runs = argparse.Namespace(preset="smoke", methods=args.methods, samplers=[], steps=args.gen_length,
                              gen_length=args.gen_length)  # smoke: a preset with bench.METHODS' decodings
    try:
        bench.check_runs(runs)
    except ValueError as error:
        ap.error(f"--gen-length={args.gen_length}: {error}")
    text = ("1,4" if args.tiny else "1,32") if args.batch_sizes is None else args.batch_sizes
    try:
        args.batch_sizes = list(dict.fromkeys(int(b) for b in text.split(",") if b.strip()))
    except ValueError:
        ap.error(f"--batch-sizes={text!r}: give comma-separated integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error(f"--batch-sizes={text!r}: give integers >= 1")
    # >= 0 as in bench.py (NaN never runs out), and finite: the JSON records it, and inf is not strict JSON
    if not (math.isfinite(args.time_budget) and args.time_budget >= 0):
        ap.error(f"--time-budget={args.time_budget}: give a finite number of seconds >= 0")
    if not torch.cuda.is_available() and not args.tiny:
        ap.error("no CUDA device: the check is for a GPU (--tiny runs it on CPU)")
    # One model at a time, with the K/V store of the largest batch: more than the device has (a
    # mistyped batch size) is refused now, not after the first runs.
    args.setting = Setting(torch.device("cpu" if args.tiny else "cuda"), torch.float32 if args.tiny else torch.bfloat16,
                           args.prompt_length, args.gen_length, args.seed)
    free, batch = bench.available_memory(args.setting.device), max(args.batch_sizes)
    for family in args.families:
        margs = model_args(family, args.tiny, args.setting)
        need = bench.weight_bytes(margs, args.setting.dtype) + bench.kv_store_bytes(
            margs, batch, args.prompt_length + args.gen_length, args.setting.dtype)
        if free is not None and need > free:
            ap.error(f"--batch-sizes={text!r}: {family} at batch {batch} takes {need / 2**30:.1f} GiB (weights and K/V "
                     f"store) and {args.setting.device} has {free / 2**30:.1f} GiB available; give smaller batch sizes "
                     "or lengths")
    if not args.no_compile:
        try:
            check_torch_version()
        except ValueError as error:
            ap.error(f"{error} (--no-compile runs the eager half)")
    # Made now, last (a refused command makes nothing): found unusable after the runs, it would lose them all.
    try:
        make_out_folder(args.out, files=("gpu_check.json", "gpu_check.md"))
    except ValueError as error:
        ap.error(str(error))
    return args


def model_args(family: str, tiny: bool, setting: Setting) -> ModelArgs:
    ns = argparse.Namespace(preset="smoke" if tiny else "llada8b", family=family,
                            prompt_length=setting.prompt_length, gen_length=setting.gen_length)
    margs = bench.model_args(ns)
    if tiny:
        return dataclasses.replace(margs, n_kv_heads=TINY_KV_HEADS[family])
    return dataclasses.replace(margs, **DREAM_7B) if family == "dream" else margs


def describe_model(margs: ModelArgs, n_params: int) -> str:
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    return (f"d {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads / {margs.n_kv_heads} KV, "
            f"ffn {margs.ffn_dim}, vocab {margs.vocab_size}, q/k/v bias {margs.qkv_bias}, "
            f"logit shift {margs.logit_shift}, {size} parameters")


def run(net: Transformer, prompts: list[list[int]], cache: CacheMethod, decoding: str, dparams: dict,
        setting: Setting) -> GenerationOutput:
    """One generation, one token per step, the same sampling draws for every run."""
    generator = torch.Generator(device=setting.device).manual_seed(setting.seed + 2)
    decoder = bench.decoder_of(decoding, dparams, setting.gen_length, setting.gen_length)
    return generate(net, prompts, decoder, cache, setting.gen_length, generator=generator)


def warm_and_time(net, prompts, make_cache: Callable[[], CacheMethod], decoding: str, dparams: dict,
                  setting: Setting) -> tuple[GenerationOutput, GenerationOutput]:
    """A warm-up generation (compiles in compiled mode), then the timed one."""
    warm = run(net, prompts, make_cache(), decoding, dparams, setting)
    return warm, run(net, prompts, make_cache(), decoding, dparams, setting)


def exact_check(net, prompts, method: str, decoding: str, dparams: dict, reference: Tensor | None,
                setting: Setting) -> dict:
    """The method refreshing every step against none's tokens ``reference``: token for token."""
    if reference is None:
        return dict(exact="n/a", note="no eager none to compare with")
    cache = build_cache(method, **{**bench.METHODS[method][0], **REFRESH_EVERY_STEP[method]})
    if cache.needs_attention:
        # Such a method's forwards take the explicit-softmax attention path, which rounds differently
        # from SDPA in bf16, and random weights' flat logits turn a last-bit difference into another
        # token: its reference is none on the same attention path.
        plain = build_cache("none")
        plain.needs_attention = True
        reference = run(net, prompts, plain, decoding, dparams, setting).tokens
    tokens = run(net, prompts, cache, decoding, dparams, setting).tokens
    return dict(exact="pass" if torch.equal(tokens, reference) else "FAIL",
                exact_agreement=float((tokens == reference).float().mean()))


def measured(out: GenerationOutput, warm: GenerationOutput, none: GenerationOutput, compiled: bool) -> dict:
    n_tokens = out.tokens.numel()
    row = dict(status="ok", seconds=out.seconds, tokens_per_s=n_tokens / out.seconds,
               speedup=none.seconds / out.seconds, peak_mem_gb=out.peak_mem_gb,
               agreement=float((out.tokens == none.tokens).float().mean()), nfe=out.nfe,
               ideal_speedup=out.ideal_speedup)
    if compiled:  # fields of the compiled loop (dllm.models.compiled); not in seconds
        row.update(compile_seconds=warm.compile_seconds + out.compile_seconds,
                   recompiles=warm.recompiles + out.recompiles,
                   cudagraph_skips=warm.cudagraph_skips + out.cudagraph_skips)
    return row


def check_model(net: Transformer, margs: ModelArgs, family: str, mode: str, batch: int, methods: list[str],
                setting: Setting, budget: Budget, eager_none: dict[tuple, Tensor]) -> list[dict]:
    """none and every method at one family, mode and batch size, grouped by decoding. ``eager_none``:
    (family, batch, decoding) -> tokens of the eager none, filled in eager mode, read in compiled mode."""
    prompts = bench.make_prompts(argparse.Namespace(seed=setting.seed, batch_size=batch,
                                                    prompt_length=setting.prompt_length), margs)
    rows: list[dict] = []

    def row(method: str, decoding: str, **fields) -> None:
        rows.append(dict(family=family, batch_size=batch, mode=mode, method=method, decoding=decoding, **fields))
        print(f"  {family:<5} b{batch:<3} {mode:<8} {method:<11} {decoding:<32} "
              + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()), flush=True)

    groups: dict[str, tuple[str, dict, list[str]]] = {}  # decoding described -> (decoding, params, methods)
    for method in methods:
        if method not in bench.METHODS:
            row(method, "", status="skipped", note="no decoding for it in scripts/bench.py METHODS")
            continue
        _, decoding, dparams = bench.METHODS[method]
        groups.setdefault(bench.describe(decoding, dparams), (decoding, dparams, []))[2].append(method)
    spent = f"time budget ({budget.seconds:.0f}s) spent"
    for described, (decoding, dparams, group) in groups.items():
        if budget.spent():
            for method in ("none", *group):
                row(method, described, status="not run", note=spent)
            continue
        try:
            warm, none = warm_and_time(net, prompts, partial(build_cache, "none"), decoding, dparams, setting)
        except Exception as err:  # report and go on with the other decodings
            row("none", described, status="error", note=f"{type(err).__name__}: {err}")
            for method in group:
                row(method, described, status="not run", note="its none failed")
            continue
        row("none", described, **measured(none, warm, none, mode == "compiled"), exact="n/a")
        if mode == "eager":
            eager_none[family, batch, described] = none.tokens
        for method in group:
            make_cache = partial(build_cache, method, **bench.METHODS[method][0])
            if budget.spent():
                row(method, described, status="not run", note=spent)
                continue
            try:
                make_cache().check_model(margs.logit_shift)
            except ValueError as err:
                row(method, described, status="skipped", note=str(err))
                continue
            try:
                warm, out = warm_and_time(net, prompts, make_cache, decoding, dparams, setting)
                fields = measured(out, warm, none, mode == "compiled")
                if method in REFRESH_EVERY_STEP:
                    hooked = mode == "compiled" and method in HOOKED
                    reference = eager_none.get((family, batch, described)) if hooked else none.tokens
                    fields.update(exact_check(net, prompts, method, decoding, dparams, reference, setting))
                else:
                    fields["exact"] = "n/a"
                row(method, described, **fields)
            except Exception as err:  # report and go on with the others
                row(method, described, status="error", note=f"{type(err).__name__}: {err}")
    return rows


def add_compiled_vs_eager(rows: list[dict]) -> None:
    """Compiled rows: eager seconds / compiled seconds of the same family, batch, method and decoding."""
    key = lambda r: (r["family"], r["batch_size"], r["method"], r["decoding"])  # noqa: E731
    eager = {key(r): r for r in rows if r["mode"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["mode"] == "compiled" and r["status"] == "ok" and key(r) in eager:
            r["compiled_vs_eager"] = eager[key(r)]["seconds"] / r["seconds"]


COLUMNS = {"family": "family", "batch_size": "batch", "mode": "mode", "method": "method", "decoding": "decoding",
           "status": "status", "tokens_per_s": "tokens/s", "speedup": "speedup vs none",
           "compiled_vs_eager": "compiled vs eager", "compile_seconds": "compile s", "recompiles": "recompiles",
           "cudagraph_skips": "CUDA-graph skips",
           "peak_mem_gb": "peak mem GB", "agreement": "agreement", "exact": "refresh 1 = none", "note": "note"}


def markdown(meta: dict, rows: list[dict]) -> str:
    def cell(value) -> str:
        text = f"{value:.3g}" if isinstance(value, float) else "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# GPU check", "",
             f"- device: {meta['device_name']} ({meta['device']}), {meta['dtype']}; torch {meta['torch']}, "
             f"CUDA {meta['cuda']}",
             f"- prompt {meta['prompt_length']}, gen {meta['gen_length']} (one token per step), batch sizes "
             f"{meta['batch_sizes']}, modes {', '.join(meta['modes'])}"
             + (f" (torch.compile mode {meta['compile_mode']})" if meta["compile_mode"] else "")]
    lines += [f"- {family}: {shape}" for family, shape in meta["models"].items()]
    lines += [f"- time: {meta['elapsed_s']:.0f}s of a {meta['time_budget_s']:.0f}s budget"
              + ("; budget spent, later runs not run" if meta["budget_spent"] else ""),
              f"- exactness (a method refreshing every step gives none's tokens): {meta['exact_pass']} pass, "
              f"{meta['exact_fail']} FAIL; runs that erred: {meta['errors']}", "",
              "| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.time_budget)
    if args.tiny:  # tiny ops gain nothing from threads, and on a busy machine extra threads slow them several-fold
        torch.set_num_threads(1)
    setting = args.setting
    device = setting.device
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    compile_mode = None if args.no_compile else bench.compile_mode_for(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# gpu_check: {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {setting.dtype}; "
          f"modes {modes}, compile mode {compile_mode}; budget {args.time_budget:.0f}s", flush=True)
    rows: list[dict] = []
    models: dict[str, str] = {}
    eager_none: dict[tuple, Tensor] = {}
    # Every family eager first, then compiled: if the budget runs out, the eager checks of both are done.
    for mode in modes:
        for family in args.families:
            margs = model_args(family, args.tiny, setting)
            # Rebuilt per mode from the same seed (the same weights), so that only one model is in memory.
            net = bench.build_model(margs, device, setting.dtype, setting.seed)
            models[family] = describe_model(margs, sum(p.numel() for p in net.parameters()))
            if mode == "compiled":
                torch._dynamo.reset()  # frees the previous model's graphs and CUDA-graph pools: peaks are its own
                compile_layers(net, mode=compile_mode)
            for batch in args.batch_sizes:
                rows += check_model(net, margs, family, mode, batch, args.methods, setting, budget, eager_none)
            del net
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_compiled_vs_eager(rows)
    meta = dict(device=str(device), device_name=device_name, dtype=str(setting.dtype).removeprefix("torch."),
                torch=torch.__version__, cuda=torch.version.cuda, tiny=args.tiny, modes=modes,
                compile_mode=compile_mode,
                prompt_length=args.prompt_length, gen_length=args.gen_length, batch_sizes=args.batch_sizes,
                models=models, time_budget_s=args.time_budget, elapsed_s=budget.elapsed(),
                budget_spent=any(r["status"] == "not run" and "budget" in r.get("note", "") for r in rows),
                exact_pass=sum(r.get("exact") == "pass" for r in rows),
                exact_fail=sum(r.get("exact") == "FAIL" for r in rows),
                errors=sum(r["status"] == "error" for r in rows))
    write_atomic(args.out / "gpu_check.json", json.dumps(dict(meta=meta, runs=rows), indent=2))
    table = markdown(meta, rows)
    write_atomic(args.out / "gpu_check.md", table)
    print("\n" + table)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 1 if meta["exact_fail"] or meta["errors"] else 0


if __name__ == "__main__":
    try:
        status = main()
    except Exception:  # a crash exits 3, which gpu_check.sh tells apart from a failed check (1)
        traceback.print_exc()
        status = 3
    sys.exit(status)
