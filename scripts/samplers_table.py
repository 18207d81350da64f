"""Samplers x the cache methods each composes with, stop_at_eos off and on: run the grid, print the table.

Each (model, decoding) pair runs as ``run.py -m`` sweeps over the cache methods it accepts
(refused combinations are found before any weight loads, with the run's own checks, and left
out with the reason), ``decoding.stop_at_eos`` off and on (``--eos all``) or on only without a
cache (``--eos none``, the default: half the runs). Finished runs are skipped (run.py's resume); a sweep
that fails stops the grid with its error line (exit 2). The table compares every row with
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
# The results CSV columns the table reads.
COLUMNS = ("status", "model", "decoding", "cache", "decoding.stop_at_eos", "accuracy", "accuracy_stderr",
           "tokens_per_forward", "throughput_useful_tok_s")


def read_results(path: Path, flag: str) -> pd.DataFrame:
    """A results CSV with the columns the table reads; ValueError (one line) for anything else."""
    if not path.is_file():
        raise ValueError(f"{flag}={path}: no such results CSV (the committed grids are under results/reference/)")
    try:
        rows = pd.read_csv(path)
    except OSError as err:
        raise ValueError(f"{flag}={path}: cannot read it ({err.strerror})") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag}={path}: not a CSV ({str(err).splitlines()[0]})") from None
    if missing := sorted(set(COLUMNS) - set(rows.columns)):
        raise ValueError(f"{flag}={path}: not a results CSV of run.py (missing columns {missing})")
    return rows


def check_overrides(extra: list[str]) -> None:
    """ValueError (one line) for extra overrides run.py would refuse in every run: an unknown key or
    preset (run.py's own check), or a value the simplest run of each model (low_confidence, no cache)
    refuses, e.g. gen_length=-5. Otherwise every cache would be skipped for it, or every job fail."""
    from dllm.overrides import unknown_key_message

    if message := unknown_key_message(extra):
        raise ValueError(message)
    for model in MODELS:
        _, refused = accepted_caches(model, "low_confidence", ["none"], extra)
        if refused:
            raise ValueError(f"model={model} decoding=low_confidence cache=none {' '.join(extra)}: {refused['none']}")


def run_job(command: list[str]) -> None:
    """Run one run.py sweep, its stderr passed through as it comes (progress bars included). Where it
    fails, stop with one line naming the sweep and run.py's error line (exit 2): a table without the
    sweep's rows would read as complete."""
    tail = b""
    with subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE) as job:  # waits for it on leaving
        for chunk in iter(lambda: job.stderr.read1(1 << 16), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4096:]  # enough for the last lines
    if job.returncode:
        lines = [line.strip() for line in tail.decode(errors="replace").splitlines() if line.strip()]
        # run.py's refusal is its "error: ..." line (a hint may follow); a crash ends with the exception
        why = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "")
        print(f"{Path(__file__).name}: error: run failed (exit {job.returncode}): {' '.join(command[1:])}: "
              f"{why.removeprefix('error: ') or 'no error message'}", file=sys.stderr)
        sys.exit(2)


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
                run_job(command)


def table(out: Path, decoders: list[str], caches: list[str], baseline: Path | None = None,
          beside: list[str] = ()) -> str:
    """The rows of ``out`` under the asked decoders and caches, and with a ``baseline`` CSV its rows of
    the same decoders under the ``beside`` caches (stop_at_eos off), the speedups' reference included."""
    rows = read_results(out, "--out")
    rows = rows[rows.decoding.isin(decoders) & rows.cache.isin(caches)]
    if baseline is not None:
        other = read_results(baseline, "--baseline")
        other = other[other.decoding.isin(decoders) & other.cache.isin(beside) & ~other["decoding.stop_at_eos"].astype(bool)]
        rows = pd.concat([other, rows], ignore_index=True)
    rows = rows[rows.status == "ok"].drop_duplicates(["model", "decoding", "cache", "decoding.stop_at_eos"], keep="last")
    base = rows[(rows.decoding == "low_confidence") & (rows.cache == "none") & ~rows["decoding.stop_at_eos"].astype(bool)]
    base_speed = base.set_index("model").throughput_useful_tok_s
    if missing := sorted(set(rows.model) - set(base_speed.index)):
        raise ValueError(f"no low_confidence / none row (stop_at_eos off) of {missing} for the speedups (add "
                         "low_confidence to --decoders and none to --caches, or give a --baseline CSV that has one)")
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
    try:  # every input checked before the first run
        if args.baseline is not None:
            read_results(args.baseline, "--baseline")
        if args.table_only:
            read_results(args.out, "--out")
        else:
            from dllm.logging.sinks import check_results_csv

            check_results_csv(args.out)  # run.py's own check: a folder, another CSV, not writable
            check_overrides(args.overrides)
    except ValueError as err:
        parser.error(str(err))
    if not args.table_only:
        run_grid(args.out.resolve(), decoders, caches, args.eos, args.overrides)
    try:
        print(table(args.out, decoders, caches, args.baseline, beside))
    except ValueError as err:  # no baseline row; or every cache was refused, so run.py wrote no CSV
        parser.error(str(err))


if __name__ == "__main__":
    main()
