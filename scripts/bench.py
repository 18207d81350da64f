#!/usr/bin/env python
"""Side-by-side speed of every cache method against ``cache=none``, in one process.

Same prompts, same random weights (``Transformer(ModelArgs(...))`` built in memory with a fixed
seed, normal init std 0.02; on CPU in float32 the linear weights are prepacked for oneDNN as the
pipeline does, unless ``--dense-weights``), each method with its paper decoding, and ``none`` timed
with the *same* decoding as the method it is compared with (computed once per decoding and reused)::

    python scripts/bench.py --preset cpu                  # LLaDA-shaped 512-d model: ~6 min on 2 cores
    python scripts/bench.py --preset cpu --repeats 3      # three interleaved rounds, medians: ~16 min
    python scripts/bench.py --preset long_cpu             # a 2048-token prompt on a 256-d model (key choice matters)
    python scripts/bench.py --preset llada8b              # LLaDA-8B shapes, for a GPU (bf16)
    python scripts/bench.py --preset moe_cpu              # LLaDA-MoE-shaped 512-d model (16 experts, 4 per row)
    python scripts/bench.py --preset llada_moe            # LLaDA-MoE-7B-A1B shapes, for a GPU (bf16)
    python scripts/bench.py --preset smoke --json out.json  # seconds; what tests/test_bench.py runs
    python scripts/bench.py --preset cpu --batch-sizes 1,4,16 --json batch.json   # batch-scaling curves
    python scripts/bench.py --preset llada8b --batch-sizes 1,8,32,64 --json batch.json  # the same on a GPU
    python scripts/bench.py --preset llada8b --compile --batch-sizes 1,32 --json compiled.json  # eager vs torch.compile

``--prompt-length`` + ``--gen-length`` may not exceed the context of the real model the preset is
shaped after (LLaDA 4096 tokens, also with ``--family dream``; LLaDA-MoE 8192; SDAR, Fast-dLLM v2 and
LLaDA2.0 32768): a longer sequence times nothing that model runs, and can take hours.

Columns: wall seconds of the timed generation (CUDA-synchronised, one warm-up excluded),
tokens/s (batch x gen_length / seconds), speedup over ``none`` with the same decoding,
ideal_speedup (1 / recompute_ratio, the linear-layer bound), efficiency = speedup / ideal,
peak memory (CUDA: max allocated during the run; CPU: peak RSS of the whole process, so it is
dominated by the weights and by earlier runs), agreement = fraction of generated tokens equal to
``none``'s (random weights give flat logits, so low agreement says little about accuracy).

The linear-layer bound counts rows only, but on real hardware a forward also has a cost that
does not shrink with its rows (every weight is read once per forward, kernels launch, small GEMMs
run at a lower FLOP rate). So the bench also times bare model forwards over 1 ... P+G active rows,
fits ``forward_ms = fixed_ms + per_row_ms x rows``, and reports attainable_speedup: the speedup
if every forward cost exactly that fit, i.e. (nfe_none x fixed + rows_none x per_row) /
(nfe x fixed + rows x per_row) with rows summed over forwards. attainable_efficiency = speedup /
attainable_speedup is then the share of what this hardware allows that the implementation gets
(the rest is the denoising loop, the LM head, attention statistics, cache bookkeeping).
weight_read_ms is the memory floor under the fixed cost: the time to read as many bytes as the
layers' weights once (with an MoE, one row's routed experts), measured as a sum over a buffer that
size; a kernel can overlap it with the per-row arithmetic, but no kernel can skip it.
The layers' GEMMs alone (nothing else of a forward; dense models) are timed and fitted the same
way: gemm_bound_speedup is the speedup if every forward cost only its GEMMs, and
gemm_efficiency_cap = gemm_bound_speedup / ideal_speedup the efficiency that no implementation
calling the same GEMM library can pass on this hardware.

With ``--repeats N`` the runs go in N interleaved rounds (none, then each method, per decoding),
so slow drift of the machine's speed hits ``none`` and the methods alike; times are medians over
rounds and the speedup is the median of the per-round speedups.

With ``--batch-sizes 1,4,16`` the whole comparison (bare-forward fit included) runs at each batch
size in turn, smallest first: b prompts from the preset's construction (the same seed, so the
first rows are the same at every size), every method against ``none`` at the same batch size and
decoding. The fit is redone per batch size rather than skipped, because the fixed cost per forward
is what a batch shares, so the attainable speedup depends on b. Every row carries ``batch_size``,
``peak_mem_gb_per_row`` (peak memory / b, weights included: the footprint per served sequence) and
``none_decoding`` (the decoding of the ``none`` it is compared with). The JSON is rewritten after
each batch size, so a sweep that runs out of memory at its largest size keeps the others, and
``--time-budget SECONDS`` starts no further batch size once that many seconds have passed since the
start (the first always runs).
``scripts/plot.py --bench-json FILE`` draws speedup and throughput against batch size.

With ``--compile`` every run (none and each method) also runs on a second copy of the same weights
(built again from the same seed) whose layer stack goes through torch.compile
(``dllm.models.compiled.compile_layers``; ``--compile-mode``: reduce-overhead by default on a GPU).
Every row carries ``mode`` (eager | compiled), its speedup over ``none`` of the same mode,
``compile_seconds`` (warm-up and timed runs; not in ``wall_s``), ``recompiles`` and
``cudagraph_skips`` (under reduce-overhead, graphs that ran without CUDA graphs: 0 when every
compiled step replays one); a compiled row also carries ``compiled_vs_eager`` (eager seconds /
compiled seconds, median over rounds). The bare-forward fit is done per mode, so the fixed cost per
forward is shown before and after compiling. The warm-up defaults to ``full``: CUDA graphs are
recorded per shape (sequence length, row bucket), and a short warm-up would leave those recordings
(and any compile of a step variant the short run lacks) to the timed run. The compiled copy is
prepacked like the eager one (CPU, float32; ``--dense-weights`` keeps both dense), so
``compiled_vs_eager`` compares compiling alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dllm import seed_argument  # noqa: E402
from dllm.atomic import file_in_the_way, make_out_folder, write_atomic  # noqa: E402
from dllm.cache.base import build_cache  # noqa: E402
from dllm.decoding.base import REGISTRY as DECODERS  # noqa: E402
from dllm.decoding.base import build_decoder  # noqa: E402
from dllm.decoding.loop import GenerationOutput, generate, kv_store  # noqa: E402
from dllm.devices import resolve_device  # noqa: E402
from dllm.metrics.timing import measure  # noqa: E402
from dllm.models.compiled import check_torch_version, compile_layers  # noqa: E402
from dllm.models.packed import PackedLinear, pack_linear_weights  # noqa: E402
from dllm.models.tiny import BASE_ARGS  # noqa: E402
from dllm.models.transformer import KVStore, ModelArgs, Transformer  # noqa: E402

PRESETS = {
    # tiny: a few seconds on CPU, for tests
    "smoke": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512,
                  prompt_length=16, gen_length=32, batch_size=1),
    # LLaDA-shaped (MHA, SwiGLU, untied head), small enough for 2 CPU cores
    "cpu": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1536, vocab_size=8192,
                prompt_length=256, gen_length=256, batch_size=1),
    # a long prompt (2048 tokens) on a smaller LLaDA-shaped model: attention over the keys dominates,
    # where the methods that choose keys (sparse_dllm, streaming, dpad) save work the linear bound misses
    "long_cpu": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768, vocab_size=8192,
                     prompt_length=2048, gen_length=64, batch_size=1),
    # LLaDA-8B shapes: d=4096, 32 layers, 32 heads (MHA), ffn 12288, vocab 126464 -- for a GPU
    "llada8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=12288, vocab_size=126464,
                    prompt_length=256, gen_length=256, batch_size=1),
    # LLaDA-MoE-shaped (an MoE FFN in every layer, QK-norm), small enough for 2 CPU cores: 16 experts of 384,
    # 4 per row, so a row's active FFN width (1536) is the cpu preset's
    "moe_cpu": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=384, n_experts=16, n_experts_per_token=4,
                    vocab_size=8192, prompt_length=256, gen_length=256, batch_size=1),
    # LLaDA-MoE-7B-A1B shapes: d 2048, 16 layers, 16 heads (MHA), 64 experts of 1024, 8 per row, vocab 157184 -- for a GPU
    "llada_moe": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=1024, n_experts=64, n_experts_per_token=8,
                      vocab_size=157184, mask_token_id=156895, prompt_length=256, gen_length=256, batch_size=1),
    # block diffusion, tiny: a few seconds on CPU, for tests
    "block_smoke": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512,
                        prompt_length=18, gen_length=32, batch_size=1,
                        model=dict(family="sdar", qk_norm=True, rope_theta=1e6, block_causal=True),
                        decoding=("block_diffusion", dict(block_length=4, steps=4, threshold=0.9))),
    # Block diffusion (block-causal attention; their own decoder; the methods of BLOCK_METHODS). SDAR-shaped
    # (Qwen3: GQA, QK-norm, head 64) and small enough for 2 CPU cores; decoded as SDAR/TraDo publish it
    "block_cpu": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1536, vocab_size=8192,
                      prompt_length=256, gen_length=256, batch_size=1,
                      model=dict(family="sdar", qk_norm=True, rope_theta=1e6, block_causal=True),
                      decoding=("block_diffusion", dict(block_length=4, steps=4, threshold=0.9))),
    # Fast-dLLM v2-shaped on CPU: Qwen2.5 (GQA, q/k/v biases, shifted logits), blocks of 32 in sub-blocks of 8
    "fast_dllm_v2_cpu": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1536, vocab_size=8192,
                             prompt_length=256, gen_length=256, batch_size=1,
                             model=dict(family="fast_dllm_v2", qkv_bias=True, rope_theta=1e6, logit_shift=1,
                                        block_causal=True),
                             decoding=("fast_dllm_v2", dict(block_length=32, sub_block_length=8, threshold=0.9))),
    # SDAR-8B-Chat / TraDo-8B shapes (Qwen3-8B: d 4096, 36 layers, 32 heads, 8 KV heads, head 128, ffn 12288) -- GPU
    "sdar8b": dict(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288, vocab_size=151936,
                   mask_token_id=151669, prompt_length=256, gen_length=256, batch_size=1,
                   model=dict(family="sdar", qk_norm=True, explicit_head_dim=128, rope_theta=1e6, block_causal=True),
                   decoding=("block_diffusion", dict(block_length=4, steps=4, threshold=0.9))),
    # LLaDA2.0-mini shapes (16B MoE, ~1.4B active: d 2048, 20 layers, 16 heads, 4 KV heads, head 128, rotary 64,
    # layer 0 dense (5120), then 256 experts of 512, 8 per row in 4 of 8 groups, 1 shared; blocks of 32) -- GPU
    "llada2_mini": dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, ffn_dim=512, vocab_size=157184,
                        mask_token_id=156895, prompt_length=256, gen_length=256, batch_size=1,
                        model=dict(family="llada2", qk_norm=True, explicit_head_dim=128, explicit_rotary_dim=64,
                                   rope_theta=600000.0, block_causal=True, n_experts=256, n_experts_per_token=8,
                                   router_score="sigmoid", n_expert_groups=8, topk_expert_groups=4,
                                   routed_scaling_factor=2.5, n_shared_experts=1, n_dense_layers=1,
                                   dense_ffn_dim=5120),
                        decoding=("block_diffusion", dict(block_length=32, steps=32, threshold=0.95))),
    # Fast_dLLM_v2_7B shapes (Qwen2.5-7B: d 3584, 28 layers, 28 heads, 4 KV heads, ffn 18944) -- GPU
    "fast_dllm_v2_7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064,
                            mask_token_id=151665, prompt_length=256, gen_length=256, batch_size=1,
                            model=dict(family="fast_dllm_v2", qkv_bias=True, rope_theta=1e6, logit_shift=1,
                                       block_causal=True),
                            decoding=("fast_dllm_v2", dict(block_length=32, sub_block_length=8, threshold=0.9))),
}

# method -> (cache params, decoding, decoding params); the papers' settings.
METHODS = {
    "dkv_decode": (dict(refresh_interval=8, variant="decode"), "low_confidence", dict(block_length=32)),
    "dkv_greedy": (dict(refresh_interval=2, window=4), "random", dict(block_length=32)),
    "d2cache": (dict(k=32, p=0.1, sigma=10.0), "certainty_prior", dict(sigma=10.0)),
    # later baselines (DESIGN.md section 5), with LLaDA's low-confidence decoding in blocks of 32
    "prefix": (dict(), "low_confidence", dict(block_length=32)),
    "dual": (dict(), "low_confidence", dict(block_length=32)),
    "dllm_cache": (dict(prompt_interval=50, response_interval=7, update_ratio=0.25), "low_confidence",
                   dict(block_length=32)),
    # the methods that choose keys (2025-26), each with the decoding its paper runs
    "elastic": (dict(gamma=0.9, window=16), "threshold", dict(block_length=None, threshold=0.9)),
    "sparse_dllm": (dict(keep_ratio=0.5), "low_confidence", dict(block_length=32)),
    "streaming": (dict(window=32), "low_confidence", dict(block_length=32)),
    "dpad": (dict(), "low_confidence", dict(block_length=32)),
}

# sampler -> decoding params (the authors' defaults, blocks capped at gen_length); each runs with
# cache=none beside none under the samplers' baseline, one-token-per-step low_confidence in blocks of 32.
# Random weights give flat predictions, so the threshold samplers commit few tokens per step here:
# their rows show the per-step cost of each rule (WINO's verification rows, KLASS's KL register).
SAMPLERS = {
    "ar": dict(block_length=32),
    "eb_sampler": dict(block_length=32),
    "pc_sampler": dict(),
    "prophet": dict(block_length=32),
    "klass": dict(block_length=64),
    "wino": dict(block_length=128),
}
SAMPLER_BASELINE = ("low_confidence", dict(block_length=32))

# The methods that run on block-diffusion models (with the preset's decoding): prefix = the exact
# prefix cache (finished blocks' K/V written once; the authors' own generation), dual = Fast-dLLM v2's
# block cache (inside the block, only the current sub-block once its first token is decoded).
BLOCK_METHODS = {"prefix": dict(), "dual": dict()}  # method -> cache params


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def is_block_preset(preset: str) -> bool:
    return "decoding" in PRESETS[preset]


def shaped_after(preset: str) -> str:
    """The family of the real model whose shapes the preset copies (--family dream changes only
    how the logits are read, not the shapes)."""
    spec = PRESETS[preset]
    return spec.get("model", {}).get("family") or ("llada_moe" if spec.get("n_experts") else "llada")


def methods_of(preset: str) -> dict:
    """method -> (cache params, decoding, decoding params) for this preset."""
    if not is_block_preset(preset):
        return METHODS
    decoding, dparams = PRESETS[preset]["decoding"]
    return {name: (cache, decoding, dparams) for name, cache in BLOCK_METHODS.items()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated cache methods to compare with none (default, and allowed: "
                         f"{', '.join(METHODS)}; for the block-diffusion presets {', '.join(BLOCK_METHODS)})")
    ap.add_argument("--samplers", default=",".join(SAMPLERS),
                    help=f"comma-separated decoders to time with cache=none against low_confidence (allowed: "
                         f"{', '.join(SAMPLERS)}; '' for none)")
    ap.add_argument("--family", choices=("llada", "dream"), default="llada",
                    help="llada: logits unshifted; dream: shifted logits (GQA shapes are not changed)")
    sizes = ap.add_mutually_exclusive_group()
    sizes.add_argument("--batch-size", type=int, help="one batch size (default: the preset's)")
    sizes.add_argument("--batch-sizes", help="comma-separated batch sizes, each a full comparison (e.g. 1,4,16 on CPU, "
                                             "1,8,32,64 on a GPU)")
    ap.add_argument("--prompt-length", type=int, help="default: the preset's")
    ap.add_argument("--gen-length", type=int,
                    help="default: the preset's; prompt + gen at most the context of the model the preset is shaped "
                         "after (LLaDA 4096, LLaDA-MoE 8192, SDAR, Fast-dLLM v2 and LLaDA2.0 32768)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: gen_length, one token per step)")
    ap.add_argument("--device", default=None,
                    help="auto | cpu | cuda | cuda:N, a device this machine has (default auto: cuda if available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--seed", type=seed_argument, default=0)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--warmup", choices=("short", "full", "none"),
                    help="one excluded warm-up generation per run: short (32 tokens, every code path; the "
                         "default), full (the timed setting; the default with --compile), none")
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved rounds of timed generations (none, then each method); medians are "
                         "reported (helps on a shared machine)")
    ap.add_argument("--dense-weights", action="store_true",
                    help="keep torch's dense linear weights on CPU instead of prepacking them for oneDNN "
                         "as the pipeline does (to see what the prepacking buys)")
    ap.add_argument("--compile", action="store_true",
                    help="also run every method on a torch.compile'd copy of the same weights and compare "
                         "(columns speedup_eager, speedup_compiled, compiled_vs_eager, compile_seconds, recompiles, "
                         "cudagraph_skips)")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile's mode for --compile (default: reduce-overhead, i.e. "
                                           "CUDA graphs, on a GPU; default on CPU)")
    ap.add_argument("--json", help="write the rows as a JSON list here")
    ap.add_argument("--time-budget", type=float,
                    help="seconds after the start past which no further batch size starts (the JSON keeps those "
                         "done; for a machine lent for a few minutes)")
    args = ap.parse_args(argv)
    args.warmup = args.warmup or ("full" if args.compile else "short")
    allowed = methods_of(args.preset)
    # '' = none of them (as for --samplers); duplicates run once
    methods = names_of(",".join(allowed) if args.methods is None else args.methods)
    methods = [m for m in methods if m != "none"]
    bad = [m for m in methods if m not in allowed]
    if bad:
        ap.error(f"--methods: unknown {bad} for --preset {args.preset} (allowed: {list(allowed)}, plus 'none' which "
                 "always runs)")
    args.methods = methods
    asked = args.samplers != ap.get_default("samplers")  # the default: all that fit the model
    args.samplers = names_of(args.samplers)
    if bad := [s for s in args.samplers if s not in SAMPLERS]:
        ap.error(f"--samplers: unknown {bad} (allowed: {list(SAMPLERS)})")
    if is_block_preset(args.preset):  # the samplers decode bidirectional models only
        if asked and args.samplers:
            ap.error(f"--samplers {','.join(args.samplers)}: the samplers decode bidirectional models; --preset "
                     f"{args.preset} is block-diffusion (allowed: --samplers '')")
        args.samplers = []
    if not args.methods and not args.samplers:
        ap.error("nothing to compare with none: --methods and --samplers are both empty")
    if args.family == "dream" and "wino" in args.samplers:
        if asked:
            ap.error("--samplers wino: WINO decodes LLaDA-family models only (--family dream)")
        args.samplers.remove("wino")  # WINO is LLaDA-only (decoding=wino refuses Dream)
    if args.compile_mode is not None and not args.compile:
        ap.error(f"--compile-mode {args.compile_mode} applies to --compile runs; add --compile")
    preset = PRESETS[args.preset]
    if (preset.get("n_experts") or "model" in preset) and args.family != "llada":
        ap.error(f"--preset {args.preset} fixes its model family; --family {args.family} does not apply")
    if args.batch_sizes is not None:
        try:
            args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
        except ValueError:
            ap.error(f"--batch-sizes={args.batch_sizes!r}: give comma-separated integers, e.g. 1,4,16")
    else:
        args.batch_sizes = [preset["batch_size"] if args.batch_size is None else args.batch_size]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error(f"batch sizes {args.batch_sizes} must be >= 1")
    del args.batch_size  # each run gets its own copy of args with one batch_size (main)
    for key in ("prompt_length", "gen_length"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    # At most the context of the real model the preset is shaped after: positions past it are ones
    # that model never sees, and every forward attends over all of them, so a mistyped length would
    # run for hours (or run out of memory) rather than time anything meaningful.
    family = shaped_after(args.preset)
    context = BASE_ARGS[family]["max_seq_len"]
    if args.prompt_length + args.gen_length > context:
        ap.error(f"--prompt-length {args.prompt_length} + --gen-length {args.gen_length} = "
                 f"{args.prompt_length + args.gen_length} tokens exceed the context of --preset {args.preset} "
                 f"({family}-shaped; allowed: a total of at most {context})")
    if args.repeats < 1:
        ap.error(f"--repeats={args.repeats} must be >= 1")
    if args.time_budget is not None and not args.time_budget >= 0:
        ap.error(f"--time-budget={args.time_budget} must be >= 0 seconds")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps={args.steps} must be >= 1")
    if args.steps is not None and is_block_preset(args.preset):
        decoding, dparams = PRESETS[args.preset]["decoding"]
        ap.error(f"--steps={args.steps}: --preset {args.preset} decodes with {decoding} on the preset's own "
                 f"schedule per block ({', '.join(f'{k}={v}' for k, v in dparams.items())}); leave --steps out")
    if args.threads is not None and not 1 <= args.threads <= (os.cpu_count() or 1):
        ap.error(f"--threads={args.threads} must be from 1 to {os.cpu_count() or 1} (this machine's cores)")
    args.steps = args.steps or args.gen_length
    # run.py's test (resolve_device): torch.device also takes names that fail only once the model is
    # built (meta, mps, cpu:3, cuda:7 on a machine with fewer GPUs), so the name must be one of this
    # machine's devices.
    try:
        args.device = resolve_device(args.device or "auto")
    except ValueError as error:  # "device='meta' (allowed here: ['auto', 'cpu'])"
        ap.error(f"--{error}")
    if args.json is not None and not args.json.strip():  # Path('') would be the current folder
        ap.error(f"--json={args.json!r}: give a file to write the rows to")
    args.json = None if args.json is None else Path(args.json)
    if args.json is not None and (args.json.is_dir() or file_in_the_way(args.json.parent) is not None):
        ap.error(f"--json={args.json}: not a file path in a folder")
    if args.json is not None and args.json.exists() and not args.json.is_file():  # /dev/null: write_atomic would replace it
        ap.error(f"--json={args.json}: not a regular file (a device or pipe); give a file to write")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.compile_mode = args.compile_mode or compile_mode_for(args.device)
    copies = 2 if args.compile else 1  # --compile times a second copy of the weights beside the first
    margs, dtype = model_args(args), getattr(torch, args.dtype)
    weights = copies * weight_bytes(margs, dtype)
    free = available_memory(args.device)
    if free is not None and weights > free:  # building it would run the machine out of memory, silently
        ap.error(f"--preset {args.preset}: its weights take {weights / 2**30:.1f} GiB in {args.dtype}"
                 f"{' (two copies with --compile)' if args.compile else ''} and {args.device} has "
                 f"{free / 2**30:.1f} GiB available; run it on a GPU (--device cuda) or choose a smaller preset")
    # The K/V store of the largest batch (the compiled copy keeps its own) beside them: a floor, not
    # the peak (activations come on top), that stops a mistyped batch size before the model is built.
    batch = max(args.batch_sizes)
    store = copies * kv_store_bytes(margs, batch, args.prompt_length + args.gen_length, dtype)
    if free is not None and weights + store > free:
        ap.error(f"batch size {batch}: the weights and K/V store{'s' if args.compile else ''} take "
                 f"{(weights + store) / 2**30:.1f} GiB in {args.dtype} and {args.device} has {free / 2**30:.1f} GiB "
                 "available; give smaller batch sizes or lengths")
    try:
        check_runs(args)
    except ValueError as error:  # its text names run.py's settings, which these flags set here
        ap.error(f"--steps={args.steps} --gen-length={args.gen_length}: {error}")
    try:
        if args.compile:
            check_torch_version()
        if args.json is not None:  # last: a refused command makes no folder; before the work, which it would lose
            make_out_folder(args.json.parent, "--json")
    except ValueError as error:
        ap.error(str(error))
    return args


def weight_bytes(margs: ModelArgs, dtype: torch.dtype) -> int:
    """The bytes of a model's parameters in ``dtype`` (counted on the meta device: nothing allocated)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in Transformer(margs).parameters())
    return count * dtype.itemsize


def kv_store_bytes(margs: ModelArgs, batch: int, length: int, dtype: torch.dtype) -> int:
    """The bytes of a generation's K/V store (built on the meta device: nothing allocated)."""
    store = KVStore(margs, batch, length, "meta", dtype)
    return sum(tensor.numel() for tensor in store.k + store.v) * dtype.itemsize


def available_memory(device: torch.device) -> int | None:
    """Bytes a new model may take on ``device``: the GPU's free memory, or the machine's available
    memory (Linux's MemAvailable); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    line = next((line for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    return None if line is None else int(line.split()[1]) * 1024


def names_of(listed: str) -> list[str]:
    """A comma-separated option's names, in order, each once."""
    return list(dict.fromkeys(name.strip() for name in listed.split(",") if name.strip()))


def check_runs(args: argparse.Namespace) -> None:
    """Every timed run's decoder accepts the lengths and steps, and its cache method the decoder, as
    the run builds them (ValueError naming the setting): a bad setting stops the bench before the
    model is built, not after the warm-ups."""
    runs = [(method, *methods_of(args.preset)[method]) for method in args.methods]
    runs += [("none", {}, name, SAMPLERS[name]) for name in args.samplers]
    for method, cache_params, decoding, dparams in runs:
        try:
            decoder = decoder_of(decoding, dparams, args.steps, args.gen_length)
            decoder.check(args.gen_length)
            build_cache(method, **cache_params).check(decoder)
        except ValueError as error:
            raise ValueError(f"cache={method} decoding={decoding}: {error}") from error


def compile_mode_for(device: torch.device) -> str:
    """CUDA graphs on a GPU, where launching a cached step's many small kernels is what they save."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def model_args(args: argparse.Namespace) -> ModelArgs:
    p = PRESETS[args.preset]
    vocab = p["vocab_size"]
    mask = p.get("mask_token_id", 126336 if vocab > 126336 else vocab - 1)  # the real mask id where the vocabulary has it
    if p.get("n_experts"):  # LLaDA-MoE: RoPE theta 50000, per-head QK-norm, top-k weights not renormalised
        family, rope_theta = "llada_moe", 50000.0
        moe = dict(n_experts=p["n_experts"], n_experts_per_token=p["n_experts_per_token"], qk_norm=True)
    else:
        family, rope_theta, moe = args.family, 500000.0 if args.family == "llada" else 1e6, {}
    fields = dict(
        family=family, dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"], ffn_dim=p["ffn_dim"], vocab_size=vocab,
        rope_theta=rope_theta, norm_eps=1e-5, qkv_bias=args.family == "dream",
        tie_embeddings=False, max_seq_len=max(4096, args.prompt_length + args.gen_length + 64),
        mask_token_id=mask, eos_token_id=1, pad_token_id=0, logit_shift=1 if args.family == "dream" else 0, **moe,
    )
    return ModelArgs(**{**fields, **p.get("model", {})})


def active_parameters(margs: ModelArgs, n_params: int) -> int:
    """Parameters one row runs through: all but the experts a row is not routed to (MoE), else all.
    recompute_ratio counts rows, so with an MoE it is the ratio of active-parameter work too."""
    idle = margs.n_experts - margs.n_experts_per_token
    return n_params - (margs.n_layers - margs.n_dense_layers) * idle * 3 * margs.dim * margs.ffn_dim


def build_model(margs: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights, normal(0, 0.02), norms 1, biases 0; built on the meta device and materialised
    once, directly in ``dtype`` on ``device`` (an 8B model is never held twice)."""
    with torch.device("meta"):
        net = Transformer(margs)
    net = net.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
        # Real checkpoints never predict the mask token; with random weights it could win the argmax
        # and leave a "decoded" position masked. A zero row (logit 0) loses to the max of the others.
        net.output.weight[margs.mask_token_id] = 0
    return net.eval().requires_grad_(False)


@torch.inference_mode()
def bare_forward_ms(nets: dict[str, Transformer], args: argparse.Namespace, repeats: int = 10
                    ) -> dict[str, dict[int, float]]:
    """Per mode, milliseconds of one bare model forward over 1 ... P + G active rows per sequence
    (:func:`forward_rows`), attending over all P + G stored keys (no decoding, no LM head). Each is
    the fastest of ``repeats`` rounds, and a round times every mode and row count in turn: on a
    shared machine noise only ever adds time, and drift then hits every point alike (a median of 3
    per point timed the cpu preset's 1-row forward at 13.3 ms in one run and 9.6 ms in the next)."""
    T = args.prompt_length + args.gen_length
    B, device = args.batch_size, args.device
    key_mask = (torch.arange(T + 1, device=device) < T).expand(B, T + 1)[:, None, None, :]
    # One scratch store serves every mode (the copies share shapes; an 8B-sized store is many GB): the
    # compiled copy's own, as in its generations. torch's CUDA-graph trees would mark a graph that
    # writes into any other tensor as mutating a non-static input, and run it without CUDA graphs
    # from then on, in the timed generations too.
    store = kv_store(nets.get("compiled", nets["eager"]), "main", B, T, device)
    calls = {}
    for mode, net in nets.items():
        for rows in forward_rows(T):
            index = torch.arange(T - rows, T, device=device).expand(B, rows)  # the last rows: response positions
            tokens = torch.full((B, rows), net.args.mask_token_id, device=device)
            calls[mode, rows] = partial(net.hidden, tokens, index, key_mask, store, index)
    ms = fastest_ms(calls, device, repeats)
    return {mode: {rows: ms[mode, rows] for rows in forward_rows(T)} for mode in nets}


def fastest_ms(calls: dict, device: torch.device, repeats: int) -> dict:
    """Milliseconds of each call: the fastest of ``repeats`` rounds after a warm-up round, where a
    round makes every call in turn (noise only ever adds time; drift hits every call alike)."""
    times: dict = {key: [] for key in calls}
    for round_ in range(repeats + 1):
        for key, call in calls.items():
            with measure(device) as cost:
                call()
            if round_:
                times[key].append(cost.seconds)
    return {key: 1e3 * min(ts) for key, ts in times.items()}


@torch.inference_mode()
def bare_gemm_ms(net: Transformer, args: argparse.Namespace, repeats: int = 10) -> dict[int, float] | None:
    """Milliseconds of the layers' linear maps alone (q, k, v, o and the FFN's, nothing else of a
    forward) over the same active-row counts as :func:`bare_forward_ms`, the fastest of ``repeats``
    rounds. Each weight is read once per pass as in a forward; the layers' weights together exceed
    the caches of the presets' hardware, so they stream from memory as they do there. A method
    whose forwards cost no more than their GEMMs would reach this fit's speedup: the cap that the
    GEMM library (oneDNN / cuBLAS, which eager and compiled steps both call) puts on efficiency.
    None for an MoE model, whose rows run through their routed experts only."""
    if net.args.n_experts:
        return None
    gemms = [m for m in net.layers.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    weight = next(net.parameters())

    def pass_over(rows: int):
        inputs = {width: torch.randn(args.batch_size, rows, width, dtype=weight.dtype, device=weight.device)
                  for width in {g.in_features for g in gemms}}

        def run() -> None:  # each output dropped at once, as a forward's are
            for gemm in gemms:
                gemm(inputs[gemm.in_features])
        return run

    return fastest_ms({rows: pass_over(rows) for rows in forward_rows(args.prompt_length + args.gen_length)},
                      args.device, repeats)


@torch.inference_mode()
def weight_read_ms(n_params: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Milliseconds to read ``n_params`` values of ``dtype`` once: the fastest of ``repeats`` sums over
    a buffer that size. A sum does nothing but read, so for the parameters a forward must read (the
    layers' weights; with an MoE a row's routed experts) this is the memory floor under a forward's
    fixed cost, which no kernel, compiled or not, can go below. At most 2^28 values are read and the
    time scaled up (an 8B model's weights would otherwise need a second copy in memory); that is
    still far more than any cache, so the rate is memory's."""
    measured = min(n_params, 1 << 28)
    buffer = torch.ones(measured, dtype=dtype, device=device)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        with measure(device) as cost:
            buffer.sum()
        times.append(cost.seconds)
    return 1e3 * min(times[1:]) * n_params / measured


@dataclass(frozen=True)
class ForwardCost:
    """Least-squares fit ``forward_ms = fixed_ms + per_row_ms x rows`` of bare forward times."""

    fixed_ms: float
    per_row_ms: float

    @classmethod
    def fit(cls, ms_by_rows: dict[int, float]) -> "ForwardCost":
        rows, ms = list(ms_by_rows), list(ms_by_rows.values())
        mean_r, mean_t = sum(rows) / len(rows), sum(ms) / len(ms)
        spread = sum((r - mean_r) ** 2 for r in rows)
        slope = sum((r - mean_r) * (t - mean_t) for r, t in zip(rows, ms)) / spread if spread else 0.0
        # Timing noise must not give a negative cost (a forward never gets cheaper with more rows).
        per_row = max(slope, 0.0)
        return cls(fixed_ms=max(mean_t - per_row * mean_r, 0.0), per_row_ms=per_row)

    def forward_ms(self, rows: float) -> float:
        return self.fixed_ms + rows * self.per_row_ms

    def run_ms(self, out: GenerationOutput, n_layers: int, batch: int) -> float:
        """Modelled time of a generation's forwards (rows per sequence, summed over forwards)."""
        rows = out.active_token_layers / (n_layers * batch)
        return out.nfe * self.fixed_ms + rows * self.per_row_ms


def forward_rows(total: int) -> list[int]:
    """Active-row counts at which bare forwards are timed (the cached methods' typical sizes, and all)."""
    return sorted({rows for rows in (1, 8, 32, 64, 128, 256) if rows < total} | {total})


def make_prompts(args: argparse.Namespace, margs: ModelArgs) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    low = 2  # skip pad/eos ids
    high = min(margs.mask_token_id, margs.vocab_size)
    return torch.randint(low, high, (args.batch_size, args.prompt_length), generator=g).tolist()


def is_block_causal(decoding: str) -> bool:
    return decoding in DECODERS.names() and DECODERS.classes[decoding].block_causal


def fit_blocks(decoding: str, params: dict, gen_length: int) -> dict:
    """``params`` with a bidirectional decoder's blocks no longer than ``gen_length`` (a short
    generation is one block; a block-diffusion decoder's block is the model's, as given)."""
    if is_block_causal(decoding) or params.get("block_length") is None:
        return params
    return {**params, "block_length": min(params["block_length"], gen_length)}


def decoder_of(name: str, params: dict, steps: int, gen_length: int):
    params = fit_blocks(name, params, gen_length)
    if is_block_causal(name):  # steps per block, as given
        return build_decoder(name, **params)
    return build_decoder(name, steps=steps, **params)


def generate_once(net, prompts, method: str, decoding: str, dparams: dict, args, gen_length: int | None = None
                  ) -> GenerationOutput:
    gen_length = gen_length or args.gen_length
    steps = max(1, args.steps * gen_length // args.gen_length)
    generator = torch.Generator(device=args.device).manual_seed(args.seed + 2)  # same draws for every run
    cache_params = methods_of(args.preset)[method][0] if method != "none" else {}
    return generate(net, prompts, decoder_of(decoding, dparams, steps, gen_length),
                    build_cache(method, **cache_params), gen_length, generator=generator)


def warm_up(net, prompts, method: str, decoding: str, dparams: dict, args) -> GenerationOutput | None:
    if args.warmup == "none":
        return None
    short = args.gen_length if args.warmup == "full" else min(32, args.gen_length)
    return generate_once(net, prompts, method, decoding, dparams, args, short)


def describe(decoding: str, dparams: dict) -> str:
    return decoding + "".join(f",{k}={v}" for k, v in dparams.items())


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    margs = model_args(args)
    t0 = time.perf_counter()
    net = build_model(margs, args.device, dtype, args.seed)
    n_params = sum(p.numel() for p in net.parameters())
    # what a forward must read of the layers' weights (before packing: packed weights are not parameters)
    layer_params = active_parameters(margs, sum(p.numel() for p in net.layers.parameters()))
    packed = not args.dense_weights and pack_linear_weights(net)  # as the pipeline does: float32 on CPU only
    nets, packed_by_mode = {"eager": net}, {"eager": packed}
    if args.compile:
        # The same weights (same seed), prepacked like the eager copy, as the pipeline does before it
        # compiles (the compiled stack calls the packed GEMM as one opaque op: dllm::packed_linear).
        nets["compiled"] = build_model(margs, args.device, dtype, args.seed)
        packed_by_mode["compiled"] = not args.dense_weights and pack_linear_weights(nets["compiled"])
        compile_layers(nets["compiled"], mode=args.compile_mode)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "cpu"
    print(f"# preset={args.preset} family={margs.family} params={n_params / 1e6:.1f}M "
          f"(active per row {active_parameters(margs, n_params) / 1e6:.1f}M) device={args.device} "
          f"({device_name}) dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"packed_weights={packed} modes={','.join(nets)}"
          + (f" compile_mode={args.compile_mode}" if args.compile else ""))
    print(f"# batch={','.join(map(str, args.batch_sizes))} prompt={args.prompt_length} gen={args.gen_length} "
          f"steps={'per block' if is_block_preset(args.preset) else args.steps} warmup={args.warmup} "
          f"repeats={args.repeats} "
          f"(model built in {time.perf_counter() - t0:.1f}s)", flush=True)
    rows: list[dict] = []
    failed: list[str] = []
    for n, batch in enumerate(args.batch_sizes):
        if n and args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
            print(f"# time budget of {args.time_budget:g}s spent: batch sizes {args.batch_sizes[n:]} not run", flush=True)
            break
        batch_args = argparse.Namespace(**vars(args), batch_size=batch)
        batch_rows, batch_failed = run_batch(nets, margs, batch_args, device_name, packed_by_mode, layer_params)
        rows += batch_rows
        failed += batch_failed
        if args.json:  # after every batch size: a later one that fails (out of memory) loses only itself
            write_json(rows, args.json)
    print()
    print(format_table(rows) if rows else "(no run finished)")
    if args.compile and rows:
        print()
        print(format_compile_table(rows))
    if args.json:
        print(f"\nwrote {args.json}")
    if failed:
        raise SystemExit(f"failed: {failed}")
    return rows


def run_batch(nets: dict[str, Transformer], margs: ModelArgs, args: argparse.Namespace, device_name: str,
              packed: dict[str, bool], layer_params: int) -> tuple[list[dict], list[str]]:
    """Every comparison at ``args.batch_size``: per mode (eager, and compiled with --compile) the
    bare-forward fit, then none and the methods in interleaved rounds. Returns the rows and the
    labels of the runs that failed. ``layer_params``: the layer weights a forward must read."""
    prompts = make_prompts(args, margs)
    T = args.prompt_length + args.gen_length
    read_ms = weight_read_ms(layer_params, getattr(torch, args.dtype), args.device)
    gemm_ms = bare_gemm_ms(nets["eager"], args)
    gemm_cost = None if gemm_ms is None else ForwardCost.fit(gemm_ms)
    gemm_fit = dict(bare_gemm_ms=None, gemm_fixed_ms=None, gemm_per_row_ms=None) if gemm_cost is None else dict(
        bare_gemm_ms={str(rows): ms for rows, ms in gemm_ms.items()}, gemm_fixed_ms=gemm_cost.fixed_ms,
        gemm_per_row_ms=gemm_cost.per_row_ms)
    fits: dict[str, tuple[dict[int, float], ForwardCost]] = {}
    for mode, forward_ms in bare_forward_ms(nets, args).items():
        cost, small = ForwardCost.fit(forward_ms), min(32, T)
        fits[mode] = forward_ms, cost
        print(f"# batch {args.batch_size}{f' {mode}' if args.compile else ''}: bare forward (ms) by active rows "
              "per sequence: " + ", ".join(f"{rows}: {ms:.1f}" for rows, ms in forward_ms.items())
              + f"\n# fit: {cost.fixed_ms:.1f} ms per forward + {cost.per_row_ms:.3f} ms per row; so a {small}-row "
              f"forward costs {cost.forward_ms(small) / cost.forward_ms(T):.1%} of a {T}-row one "
              f"(the linear-layer bound says {small / T:.1%}); reading the layers' weights once takes "
              f"{read_ms:.1f} ms", flush=True)
    if gemm_cost is not None:
        print(f"# batch {args.batch_size}: the layers' GEMMs alone (ms): "
              + ", ".join(f"{rows}: {ms:.1f}" for rows, ms in gemm_ms.items())
              + f"\n# fit: {gemm_cost.fixed_ms:.1f} ms + {gemm_cost.per_row_ms:.3f} ms per row; so a {small}-row "
              f"forward's GEMMs cost {gemm_cost.forward_ms(small) / gemm_cost.forward_ms(T):.1%} of a {T}-row one's",
              flush=True)

    rows: list[dict] = []
    n_tokens = args.batch_size * args.gen_length

    def record(mode: str, method, decoding, dparams, warm: GenerationOutput | None, outs: list[GenerationOutput],
               refs: list[GenerationOutput], none_decoding: str, eager: list[GenerationOutput] | None) -> dict:
        out, ref = outs[0], refs[0]  # every round generates the same tokens; times differ
        forward_ms, cost = fits[mode]
        # True medians (the mean of the middle two of an even count), of the times and of each round's
        # ratio to its none: a lower median of two rounds would report the worse ratio beside the faster time.
        seconds = statistics.median(o.seconds for o in outs)
        speedup = statistics.median(r.seconds / o.seconds for r, o in zip(refs, outs))
        attainable = cost.run_ms(ref, margs.n_layers, args.batch_size) / cost.run_ms(out, margs.n_layers, args.batch_size)
        gemm_bound = None if gemm_cost is None else (gemm_cost.run_ms(ref, margs.n_layers, args.batch_size)
                                                     / gemm_cost.run_ms(out, margs.n_layers, args.batch_size))
        peak = max(o.peak_mem_gb for o in outs)
        ref_peak = max(r.peak_mem_gb for r in refs)
        row = dict(
            method=method, decoding=describe(decoding, dparams), none_decoding=none_decoding, mode=mode,
            wall_s=seconds, round_wall_s=[o.seconds for o in outs], tokens_per_s=n_tokens / seconds, speedup=speedup,
            ideal_speedup=out.ideal_speedup,
            efficiency=speedup / out.ideal_speedup, attainable_speedup=attainable,
            attainable_efficiency=speedup / attainable, peak_mem_gb=peak, peak_mem_gb_per_row=peak / args.batch_size,
            mem_vs_none=peak / ref_peak if ref_peak else float("nan"),
            agreement=float((out.tokens == ref.tokens).float().mean()),
            ideal_speedup_attention=out.total_flops / out.flops, peak_kv_gb=out.peak_kv_gb,
            nfe=out.nfe, recompute_ratio=out.recompute_ratio,
            cache_params=methods_of(args.preset).get(method, ({},))[0],
            decoding_params=dparams, preset=args.preset, family=margs.family, batch_size=args.batch_size,
            # a block-diffusion decoder's steps are per block, in decoding_params
            prompt_length=args.prompt_length, gen_length=args.gen_length,
            steps=None if is_block_causal(decoding) else args.steps,
            device=str(args.device), device_name=device_name, dtype=args.dtype,
            threads=torch.get_num_threads(), packed_weights=packed[mode], repeats=len(outs), torch=torch.__version__,
            bare_forward_ms={str(rows): ms for rows, ms in forward_ms.items()},
            forward_fixed_ms=cost.fixed_ms, forward_per_row_ms=cost.per_row_ms, weight_read_ms=read_ms,
            **gemm_fit, gemm_bound_speedup=gemm_bound,
            gemm_efficiency_cap=None if gemm_bound is None else gemm_bound / out.ideal_speedup,
        )
        if args.compile:  # compile columns only where a compiled copy runs
            ran = [o for o in (warm, *outs) if o is not None]
            row.update(compile_seconds=sum(o.compile_seconds for o in ran), recompiles=sum(o.recompiles for o in ran),
                       cudagraph_skips=sum(o.cudagraph_skips for o in ran))
        if eager is not None:
            row["compiled_vs_eager"] = statistics.median(e.seconds / o.seconds for e, o in zip(eager, outs))
        print(f"  {f'{mode:<9}' if args.compile else ''}{method:<11} {row['decoding']:<34} {seconds:8.2f}s  "
              f"{row['tokens_per_s']:8.1f} tok/s  x{speedup:.2f} (ideal x{out.ideal_speedup:.2f}, attainable "
              f"x{attainable:.2f})  agree {row['agreement']:.3f}", flush=True)
        return row

    # baseline decoding -> runs compared with none under it, so that rows sharing a none sit together
    groups: dict[str, list[tuple[str, str, dict]]] = {}
    # (the settings that run, and are recorded: blocks no longer than the generation)
    for method in args.methods:
        _, decoding, dparams = methods_of(args.preset)[method]
        dparams = fit_blocks(decoding, dparams, args.gen_length)
        groups.setdefault(describe(decoding, dparams), [("none", decoding, dparams)]).append((method, decoding, dparams))
    if args.samplers:
        baseline, baseline_params = SAMPLER_BASELINE
        baseline_params = fit_blocks(baseline, baseline_params, args.gen_length)
        group = groups.setdefault(describe(baseline, baseline_params), [("none", baseline, baseline_params)])
        group.extend(("none", name, fit_blocks(name, SAMPLERS[name], args.gen_length)) for name in args.samplers)
    failed = []
    for none_decoding, entries in groups.items():
        # mode -> (index into entries, warm-up output, timed outputs) of the runs whose warm-up succeeded
        runs: dict[str, list[tuple[int, GenerationOutput | None, list[GenerationOutput]]]] = {}
        for mode, net in nets.items():
            ok = []
            for i, (method, decoding, dparams) in enumerate(entries):
                try:
                    ok.append((i, warm_up(net, prompts, method, decoding, dparams, args), []))
                except Exception as err:  # report and go on with the others
                    label = (f"{method if method != 'none' else describe(decoding, dparams)} (batch {args.batch_size}"
                             f"{f', {mode}' if args.compile else ''})")
                    print(f"  {label:<11} FAILED: {type(err).__name__}: {err}", flush=True)
                    failed.append(label)
            if ok and ok[0][0] == 0:  # else the baseline none failed: nothing to compare with
                runs[mode] = ok
        for _ in range(args.repeats):  # interleaved rounds: drift hits none and the methods (and modes) alike
            for mode, mode_runs in runs.items():
                for i, _, outs in mode_runs:
                    outs.append(generate_once(nets[mode], prompts, *entries[i], args))
        eager = {i: outs for i, _, outs in runs.get("eager", [])}
        for mode, mode_runs in runs.items():
            for i, warm, outs in mode_runs:
                rows.append(record(mode, *entries[i], warm, outs, mode_runs[0][2], none_decoding,
                                   eager.get(i) if mode == "compiled" else None))
    return rows, failed


def write_json(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(rows, indent=2))


def format_table(rows: list[dict]) -> str:
    import pandas as pd

    modes = ["mode"] if any(r["mode"] == "compiled" for r in rows) else []
    cols = ["batch_size", "method", "decoding", *modes, "wall_s", "tokens_per_s", "speedup", "ideal_speedup",
            "efficiency", "attainable_speedup", "attainable_efficiency", "gemm_efficiency_cap", "ideal_speedup_attention",
            "peak_kv_gb",
            "peak_mem_gb", "peak_mem_gb_per_row", "mem_vs_none", "agreement"]
    df = pd.DataFrame(rows)[cols].rename(columns={"batch_size": "batch", "wall_s": "wall s", "tokens_per_s": "tokens/s",
                                                  "speedup": "speedup vs none", "ideal_speedup": "ideal speedup",
                                                  "attainable_speedup": "attainable speedup",
                                                  "attainable_efficiency": "attainable efficiency",
                                                  "gemm_efficiency_cap": "GEMM efficiency cap",
                                                  "ideal_speedup_attention": "ideal (attention) speedup",
                                                  "peak_kv_gb": "peak KV GB",
                                                  "peak_mem_gb_per_row": "peak mem GB / row"})
    return render(df)


def format_compile_table(rows: list[dict]) -> str:
    """One line per run present in both modes: each mode's speedup over its own none, and compiled vs eager."""
    import pandas as pd

    df = pd.DataFrame(rows)
    key = ["batch_size", "method", "decoding"]
    both = df[df["mode"] == "eager"].merge(df[df["mode"] == "compiled"], on=key, suffixes=("_eager", "_compiled"))
    cols = {"batch_size": "batch", "method": "method", "decoding": "decoding", "tokens_per_s_eager": "tokens/s eager",
            "tokens_per_s_compiled": "tokens/s compiled", "speedup_eager": "speedup_eager",
            "speedup_compiled": "speedup_compiled", "compiled_vs_eager_compiled": "compiled_vs_eager",
            "compile_seconds_compiled": "compile_seconds", "recompiles_compiled": "recompiles",
            "cudagraph_skips_compiled": "cudagraph_skips"}
    return render(both[list(cols)].rename(columns=cols))


def render(df) -> str:
    try:
        import tabulate  # noqa: F401

        return df.to_markdown(index=False, floatfmt=".3g")
    except ImportError:
        return df.to_string(index=False, float_format=lambda v: f"{v:.3g}")


if __name__ == "__main__":
    main()
