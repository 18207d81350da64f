"""Samplers x the cache methods each composes with, stop_at_eos off and on: run the grid, print the table.

Each (model, decoding) pair runs as ``run.py -m`` sweeps over the cache methods it accepts
(refused combinations are found before any weight loads, with the run's own checks, and left
out with the reason), ``decoding.stop_at_eos`` off and on (``--eos all``) or on only without a
cache (``--eos none``, the default: half the runs). Finished runs are skipped (run.py's resume). The table compares every row with
one-token-per-step ``low_confidence`` under ``cache=none`` (stop_at_eos off) of the same model:

    python scripts/samplers_table.py --out results/samplers_caches.csv        # run, then print
    python scripts/samplers_table.py --out results/samplers_caches.csv --table-only
    python scripts/samplers_table.py --decoders low_confidence --caches elastic,dpad --out results/more.csv
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("tiny_llada", "tiny_dream")
DECODERS = ("low_confidence", "ar", "eb_sampler", "pc_sampler", "prophet", "klass", "wino")
CACHES = ("none", "prefix", "dual", "dkv_decode", "dkv_greedy", "d2cache", "dllm_cache")


def accepted_caches(model: str, decoding: str, caches: list[str], extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The caches this (model, decoding) runs with, and why the others are refused."""
    from hydra import compose, initialize_config_dir

    from dllm.pipeline import check_checkpoint, plan_run

    accepted, refused = [], {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for cache in caches:
            cfg = compose("config", overrides=[f"model={model}", f"decoding={decoding}", f"cache={cache}", *extra])
            try:
                check_checkpoint(cfg, plan_run(cfg))
                accepted.append(cache)
            except ValueError as err:
                refused[cache] = str(err)
    return accepted, refused


def run_grid(out: Path, decoders: list[str], caches: list[str], eos: str, extra: list[str]) -> None:
    for model in MODELS:
        for decoding in decoders:
            accepted, refused = accepted_caches(model, decoding, caches, extra)
            for cache, reason in refused.items():
                print(f"skip {model} {decoding} cache={cache}: {reason}", flush=True)
            both = accepted if eos == "all" else [c for c in accepted if c == "none"]
            for group, stops in ((both, "false,true"), ([c for c in accepted if c not in both], "false")):
                if not group:
                    continue
                command = [sys.executable, "run.py", "-m", f"model={model}", f"decoding={decoding}",
                           f"cache={','.join(group)}", f"decoding.stop_at_eos={stops}", f"results_csv={out}", *extra]
                print(" ".join(command[1:]), flush=True)
                subprocess.run(command, cwd=ROOT, check=True)


def table(out: Path, decoders: list[str], caches: list[str], baseline: Path | None = None,
          beside: list[str] = ()) -> str:
    """The rows of ``out`` under the asked decoders and caches, and with a ``baseline`` CSV its rows of
    the same decoders under the ``beside`` caches (stop_at_eos off), the speedups' reference included."""
    rows = pd.read_csv(out)
    rows = rows[rows.decoding.isin(decoders) & rows.cache.isin(caches)]
    if baseline is not None:
        other = pd.read_csv(baseline)
        other = other[other.decoding.isin(decoders) & other.cache.isin(beside) & ~other["decoding.stop_at_eos"].astype(bool)]
        rows = pd.concat([other, rows], ignore_index=True)
    rows = rows[rows.status == "ok"].drop_duplicates(["model", "decoding", "cache", "decoding.stop_at_eos"], keep="last")
    base = rows[(rows.decoding == "low_confidence") & (rows.cache == "none") & ~rows["decoding.stop_at_eos"].astype(bool)]
    base_speed = base.set_index("model").throughput_useful_tok_s
    order = {name: i for i, name in enumerate(DECODERS)}
    rows = rows.assign(_d=rows.decoding.map(order).fillna(len(order)),
                       _c=rows.cache.map({c: i for i, c in enumerate(CACHES)}).fillna(len(CACHES)))
    rows = rows.sort_values(["model", "_d", "_c", "decoding.stop_at_eos"])
    lines = ["| model | decoding | cache | stop_at_eos | accuracy (%) | tokens / forward | useful tok/s | speedup |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows.to_dict("records"):
        speedup = r["throughput_useful_tok_s"] / base_speed[r["model"]]
        lines.append(f"| {r['model']} | {r['decoding']} | {r['cache']} | {'on' if r['decoding.stop_at_eos'] else 'off'} | "
                     f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f} | {r['tokens_per_forward']:.2f} | "
                     f"{r['throughput_useful_tok_s']:.0f} | {speedup:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/samplers_caches.csv"), help="results CSV of the grid")
    parser.add_argument("--table-only", action="store_true", help="print the table of an existing --out")
    parser.add_argument("--decoders", default=",".join(DECODERS), help="comma-separated decodings (default: %(default)s)")
    parser.add_argument("--caches", default=",".join(CACHES), help="comma-separated cache methods (default: %(default)s)")
    parser.add_argument("--eos", choices=("none", "all"), default="none",
                        help="decoding.stop_at_eos off and on for cache=none only (none) or for every cache (all)")
    parser.add_argument("--baseline", type=Path, help="a results CSV holding the low_confidence / none rows the "
                                                          "speedups refer to, when --out has none")
    parser.add_argument("--beside", default="none,prefix,dual",
                        help="the --baseline's caches shown beside --out's rows, stop_at_eos off (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides for every run (e.g. task.limit=20)")
    args = parser.parse_args()
    decoders, caches, beside = args.decoders.split(","), args.caches.split(","), args.beside.split(",")
    from dllm.cache.base import cache_names
    from dllm.decoding.base import decoder_names

    for kind, asked, allowed in (("--decoders", decoders, decoder_names()), ("--caches", caches, cache_names()),
                                 ("--beside", beside, cache_names())):
        if bad := [name for name in asked if name not in allowed]:
            parser.error(f"{kind}: unknown {bad} (allowed: {sorted(allowed)})")
    for flag, path in (("--out", args.out if args.table_only else None), ("--baseline", args.baseline)):
        if path is not None and not path.is_file():
            parser.error(f"{flag}={path}: no such results CSV (the committed grids are under results/reference/)")
    if not args.table_only:
        run_grid(args.out.resolve(), decoders, caches, args.eos, args.overrides)
    print(table(args.out, decoders, caches, args.baseline, beside))


if __name__ == "__main__":
    main()
