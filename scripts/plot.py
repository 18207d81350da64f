"""Paper figures from a results CSV, and the per-step recompute map of every cache method.

    python scripts/plot.py results/runs.csv                                    # -> outputs/figures/
    python scripts/plot.py results/example_runs.csv --trace --out results/figures  # (the committed ones: results/reference/figures)
    python scripts/plot.py results/runs.csv --published results/published.csv # + the papers' points
    python scripts/plot.py --bench-json batch.json --out figures               # scripts/bench.py --batch-sizes

Every figure is written as PDF (vector, fonts embedded) and PNG under ``--out`` (default
``outputs/figures``, not committed: the committed figures change only when asked for). Each cache
method has one colour of the Okabe–Ito palette (colour-blind safe) and one marker shape across all
figures (``METHOD_STYLE``), so methods stay apart without colour too.

- ``accuracy_vs_throughput``: one panel per table of scripts/aggregate.py (model, task, setting),
  all on one accuracy axis (and one throughput axis where all ran on the same hardware): accuracy
  (%, ± stderr) against useful tokens per second (± std over timing repeats, where recorded), one
  point per method, the Pareto front (no other method is both faster and more accurate) drawn as a
  line through ringed points.
- ``speedup``: one panel per (task, setting), one speedup axis: bars per model and method, the
  measured speedup over ``none`` (generation time ratio, ± its spread where recorded), the ideal
  speedup (1 / recompute ratio) as a black line across the bar, the method's marker at the bar's
  foot, the value written inside the bar's top (above the bar, or its ideal line, where it would
  not fit or would touch that line).
- ``recompute_map`` (``--trace``): positions x denoising steps, one panel per method: the fraction
  of layers that recompute each position at each step, for one generation of the tiny model
  (``generate(..., record_trace=True)``; dLLM-Cache's per-layer choices are recorded from its layer hook).
- ``batch_scaling`` (``--bench-json``, the JSON of ``scripts/bench.py --batch-sizes``): speedup over
  ``none`` (same decoding, same batch size) and throughput against batch size (log2), one line per
  cache method; the throughput panel also has ``none`` under each decoding (black, one dash pattern
  each). The samplers' rows (``none`` under another decoding) are left out: the figure is about caches.
  A ``bench.py --compile`` JSON has every line twice: eager, and compiled (e.g. ``dual (compiled)``,
  against the compiled ``none``; same colour, marker and dashes, hollow markers).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter, NullLocator  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aggregate  # noqa: E402
from dllm.atomic import make_out_folder, write_atomic  # noqa: E402

# cache method -> (colour, marker). Colours: Okabe & Ito's palette, told apart under the common
# colour-vision deficiencies (its yellow is too faint on white for points); the marker shape keeps
# methods apart in greyscale print and for readers who cannot tell two colours apart.
METHOD_STYLE = {
    "none": ("#000000", "o"),
    "dllm_cache": ("#E69F00", "s"),
    "prefix": ("#56B4E9", "^"),
    "dual": ("#009E73", "v"),
    "dkv_decode": ("#0072B2", "D"),
    "dkv_greedy": ("#CC79A7", "P"),
    "d2cache": ("#D55E00", "X"),
}
OTHER_COLOUR = "#7f7f7f"  # methods added later: grey, told apart by marker
OTHER_MARKERS = ["*", "h", "p", "<", ">"]
# Several variants of one cache in a table (e.g. dkv_greedy without / with window): same colour and
# marker, told apart by fill (points: full, hollow, half) or hatch (bars). The papers' numbers are
# faded points.
FILLS = ["full", "hollow", "left", "bottom"]
HATCHES = ["", "//", "..", "xx", "\\\\"]
FOOT_MARKER_Y, FOOT_MARKER_SIZE = 6, 4  # points: the method's marker drawn at the foot of its speedup bar
DASHES = ["-", "--", ":", "-."]  # batch_scaling: lines of one colour (none per decoding; grey methods)
PROMPT_LINE = "#E69F00"  # visible on both ends of the Blues colour map
TRACE_METHODS = ["none", "dkv_decode", "dkv_greedy", "d2cache", "prefix", "dual", "dllm_cache"]
TRACE_PROMPT = "Question: Tom has 9 marbles. He buys 3 more and loses 5. How many marbles does Tom have now?\nAnswer:"

plt.rcParams.update({
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "pdf.fonttype": 42, "ps.fonttype": 42,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 200,
})


def style_of(cache: str) -> tuple[str, str]:
    """(colour, marker) of a cache method."""
    if cache in METHOD_STYLE:
        return METHOD_STYLE[cache]
    return OTHER_COLOUR, OTHER_MARKERS[sum(map(ord, cache)) % len(OTHER_MARKERS)]


def _fill(variant: int, colour: str) -> dict:
    """Marker fill of the n-th variant of a cache in one table: full, hollow (white inside, so
    that error bars do not show through), then half filled."""
    fill = FILLS[variant % len(FILLS)]
    if fill == "hollow":
        return {"fillstyle": "full", "mfc": "white"}
    return {"fillstyle": fill, "mfc": colour, "markerfacecoloralt": "white"}


def _value(value) -> float | None:
    """A table cell as a number; None where it is empty (e.g. no std recorded)."""
    return None if value is None or pd.isna(value) else float(value)


# The figures this script draws (each as .pdf and .png), as save() names them.
FIGURES = ("accuracy_vs_throughput", "speedup", "batch_scaling", "recompute_map")


def save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for path in paths:
        image = io.BytesIO()  # rendered whole before the file is replaced: never half a figure on disk
        fig.savefig(image, format=path.suffix[1:], bbox_inches="tight")
        write_atomic(path, image.getvalue())
    plt.close(fig)
    return paths


def _grid(n: int, sharex: bool = False, sharey: bool = True, width: float = 7.0, height: float = 2.4, cols: int = 3):
    """n panels that show the same quantity: one y axis (and x axis) for all, so heights compare.
    Shared after creation, not by plt.subplots, so that every panel keeps its tick labels (a
    panel above an empty slot would lose its x labels)."""
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width if cols > 1 else 3.4, height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    panels = list(axes.flat[:n])
    for ax in panels[1:]:
        if sharex:
            ax.sharex(panels[0])
        if sharey:
            ax.sharey(panels[0])
    return fig, panels


def _variants(table: pd.DataFrame) -> dict[str, int]:
    """Index of each method label among the labels of the same cache (marker / hatch choice)."""
    seen: dict[str, list[str]] = {}
    for cache, label in zip(table["cache"], table["method"]):
        seen.setdefault(cache, [])
        if label not in seen[cache]:
            seen[cache].append(label)
    return {label: labels.index(label) for labels in seen.values() for label in labels}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x and y larger is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# ----------------------------------------------------------------------------------------------- from the CSV
def plot_accuracy_vs_throughput(tables, out: Path) -> list[Path]:
    # Throughputs compare across panels only when measured on one machine.
    fig, axes = _grid(len(tables), sharex=len({key["hardware"] for key, _ in tables}) == 1)
    handles = {}
    for ax, (key, table) in zip(axes, tables):
        table = table.dropna(subset=["accuracy", "tok/s"])
        variants = _variants(table)
        points = list(zip(table["tok/s"], table["accuracy"]))
        for row in table.to_dict("records"):
            colour, marker = style_of(row["cache"])
            look = {"marker": marker, "color": colour, "ms": 5, "mec": colour, "mew": 1.0,
                    **_fill(variants[row["method"]], colour)}
            ax.errorbar(row["tok/s"], row["accuracy"], yerr=_value(row["accuracy_stderr"]), xerr=_value(row["tok/s std"]),
                        ls="none", elinewidth=0.7, capsize=1.5, zorder=3, **look)
            # The legend shows the marker alone: error bars drawn across it would hide its fill.
            handles.setdefault(row["method"], Line2D([], [], ls="none", **look))
        front = pareto_front(points)
        if front:
            xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
            line = ax.plot(xs, ys, color="black", lw=0.8, ls="--", zorder=2)[0]
            ring = ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="black", lw=0.8, zorder=4)
            handles.setdefault("Pareto front", (line, ring))
        if "paper acc" in table and table["paper acc"].notna().any():
            paper = table.dropna(subset=["paper acc", "paper tok/s"])
            for x, y, cache in zip(paper["paper tok/s"], paper["paper acc"], paper["cache"]):
                colour, marker = style_of(cache)
                h = ax.scatter(x, y, s=28, color=colour, marker=marker, alpha=0.35, lw=0, zorder=2.5)
                handles.setdefault("published (faded)", h)
        ax.set_title(f"{key['model']} · {key['task']}\n{aggregate.setting_text(key)}")
        ax.set_xlabel("throughput (useful tokens / s)")
        ax.set_ylabel("accuracy (%, ± stderr)")
        ax.margins(x=0.15, y=0.15)
        ax.grid(alpha=0.3, lw=0.5)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside upper center", ncol=min(4, len(handles)), frameon=False)
    return save(fig, out, "accuracy_vs_throughput")


def plot_speedup(tables, out: Path) -> list[Path]:
    panels: dict[tuple, list] = {}
    for key, table in tables:
        setting = {k: v for k, v in key.items() if k != "model"}
        panels.setdefault(tuple(sorted(setting.items())), []).append((key, table))
    fig, axes = _grid(len(panels), height=3.0)  # tall enough for most values to fit inside their bars
    handles, top, values, ideal_handle = {}, 1.0, [], None
    for ax, (setting, entries) in zip(axes, panels.items()):
        labels = []  # every method label of the panel, in table order
        for _, table in entries:
            labels += [label for label in table["method"] if label not in labels]
        width = 0.8 / max(1, len(labels))
        # The method's marker at the foot of its bar: bars are told apart without colour too.
        foot = offset_copy(ax.transData, fig=fig, y=FOOT_MARKER_Y, units="points")
        for m, (key, table) in enumerate(entries):
            variants = _variants(table)
            rows = {label: row for label, row in zip(table["method"], table.to_dict("records"))}
            for i, label in enumerate(labels):
                row = rows.get(label)
                speedup = _value(row["speedup"]) if row is not None else None
                if speedup is None:
                    continue
                x = m + (i - (len(labels) - 1) / 2) * width
                colour, marker = style_of(row["cache"])
                std, ideal = _value(row["speedup std"]), _value(row["ideal"])
                bar = ax.bar(x, speedup, width * 0.92, yerr=std, color=colour, hatch=HATCHES[variants[label] % len(HATCHES)],
                             edgecolor="white", lw=0.3, zorder=3, error_kw={"elinewidth": 0.7, "capsize": 1.5, "zorder": 5})
                symbol = ax.plot([x], [0], ls="none", marker=marker, ms=FOOT_MARKER_SIZE, mfc="white", mec="black",
                                 mew=0.5, transform=foot, zorder=4)[0]
                handles.setdefault(label, (bar.patches[0], symbol))
                if ideal is not None:
                    ideal_handle = ax.hlines(ideal, x - width * 0.5, x + width * 0.5, color="black", lw=1.2, zorder=4)
                values.append((ax, x, speedup, std, ideal, colour))
                top = max(top, speedup + (std or 0.0), ideal or 0.0)
        ax.axhline(1.0, color="black", lw=0.6, ls=":")
        ax.set_xticks(range(len(entries)), [key["model"] for key, _ in entries])
        first = entries[0][0]
        ax.set_title(f"{first['task']}\n{aggregate.setting_text(first)}")
        ax.set_ylabel("speedup over none (×)")
        ax.set_xlabel("model")
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    axes[0].set_ylim(0, top * 1.3)  # shared: room for a value above the highest bar or ideal line
    if ideal_handle is not None:  # after the methods in the legend
        handles["ideal (1 / recompute ratio)"] = ideal_handle
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside upper center", ncol=min(4, len(handles)), frameon=False)
    fig.canvas.draw()  # the final layout: where a value fits depends on its bar's height in points
    for value in values:
        _place_value(*value)
    return save(fig, out, "speedup")


def _place_value(ax, x: float, speedup: float, std: float | None, ideal: float | None, colour: str) -> None:
    """Write a bar's speedup where it touches neither the ideal line nor the method's marker:
    inside the bar under its top (and under its error bar), else just above the bar, else above
    the ideal line (or the bar, whichever is higher). Rotated, so that it stays within its own
    bar's column."""
    points = ax.figure.dpi / 72  # display units per point
    foot = ax.transData.transform((x, 0))[1] + (FOOT_MARKER_Y + FOOT_MARKER_SIZE) * points  # marker top + a gap
    ideal_y = None if ideal is None else ax.transData.transform((x, ideal))[1]
    spread = std or 0.0
    tries = [
        {"xy": (x, speedup - spread), "xytext": (0, -2), "va": "top", "color": _ink_on(colour)},
        {"xy": (x, speedup + spread), "xytext": (0, 2), "va": "bottom", "color": "black"},
    ]
    if ideal is not None:
        tries.append({"xy": (x, max(ideal, speedup + spread)), "xytext": (0, 2), "va": "bottom", "color": "black"})
    for place in tries:
        text = ax.annotate(f"{speedup:.2f}", textcoords="offset points", rotation=90, ha="center", fontsize=6, **place)
        box = text.get_window_extent()
        clear = box.y0 >= foot and (ideal_y is None or not box.y0 - 2 * points <= ideal_y <= box.y1 + 2 * points)
        if clear or place is tries[-1]:
            return
        text.remove()


def _ink_on(colour: str) -> str:
    """Black or white, whichever contrasts more with the colour (WCAG relative luminance)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > 0.179 else "white"


# ----------------------------------------------------------------------------------------------- from bench.py
# What plot_batch_scaling reads from every row (``mode`` too where present).
BENCH_KEYS = ["method", "decoding", "none_decoding", "batch_size", "speedup", "tokens_per_s", "preset", "device_name",
              "dtype", "prompt_length", "gen_length"]


def load_bench_rows(path: str) -> list[dict]:
    """The rows of a scripts/bench.py JSON; ValueError (one line) for anything else."""
    try:
        rows = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"--bench-json {path}: cannot read it ({err.strerror})") from None
    except ValueError as err:  # not JSON, or not text
        raise ValueError(f"--bench-json {path}: not JSON ({err})") from None
    if not (isinstance(rows, list) and rows and all(isinstance(row, dict) for row in rows)):
        raise ValueError(f"--bench-json {path}: not a list of scripts/bench.py rows (a JSON list of objects)")
    missing = sorted({key for row in rows for key in BENCH_KEYS if key not in row})
    if missing:
        raise ValueError(f"--bench-json {path}: its rows lack {missing}; an older scripts/bench.py's JSON? "
                         "(run scripts/bench.py --batch-sizes ... --json again)")
    for number, row in enumerate(rows, 1):  # what the figure reads, as bench.py writes it
        problems = [f"{key}={row[key]!r} (allowed: a text)" for key in ("method", "decoding", "none_decoding")
                    if not isinstance(row[key], str)]
        if row.get("mode", "eager") not in ("eager", "compiled"):  # absent before --compile: eager
            problems.append(f"mode={row['mode']!r} (allowed: 'eager', 'compiled')")
        if isinstance(row["batch_size"], bool) or not isinstance(row["batch_size"], int) or row["batch_size"] < 1:
            problems.append(f"batch_size={row['batch_size']!r} (allowed: an integer >= 1)")
        problems += [f"{key}={row[key]!r} (allowed: a finite number > 0)" for key in ("speedup", "tokens_per_s")
                     if isinstance(row[key], bool) or not isinstance(row[key], (int, float))
                     or not 0 < row[key] < math.inf]
        if problems:
            raise ValueError(f"--bench-json {path}: row {number}: {problems[0]}")
    return rows


def plot_batch_scaling(rows: list[dict], out: Path) -> list[Path]:
    """Speedup over none and throughput against batch size, from scripts/bench.py's JSON rows."""
    series: dict[tuple[str, str, str], dict[int, dict]] = {}  # (method, none's decoding, mode) -> batch size -> row
    for row in rows:
        if row["method"] == "none" and row["decoding"] != row["none_decoding"]:
            continue  # a sampler run with cache=none, not a baseline
        # The baselines are told apart by decoding. bench.py --compile runs every comparison eager and
        # compiled, each against the none of its own mode: one series per mode (JSONs from before
        # --compile have no mode: all eager).
        decoding = row["decoding"].split(",")[0] if row["method"] == "none" else ""
        series.setdefault((row["method"], decoding, row.get("mode", "eager")), {})[row["batch_size"]] = row
    sizes = sorted({b for points in series.values() for b in points})
    lines = list(dict.fromkeys(key[:2] for key in series))  # (method, none's decoding), in the JSON's order
    nones = [decoding for method, decoding in lines if method == "none"]  # one dash pattern each
    greys = [method for method, _ in lines if method != "none" and style_of(method)[0] == OTHER_COLOUR]  # dashes too
    fig, (speed_ax, rate_ax) = plt.subplots(1, 2, figsize=(7.0, 2.8), layout="constrained")
    # The legend: the baselines first, each series' compiled mode after its eager one.
    for method, decoding, mode in sorted(series, key=lambda k: (k[0] != "none", lines.index(k[:2]), k[2] != "eager")):
        points = series[method, decoding, mode]
        batches = sorted(points)
        detail = ", ".join(d for d in (decoding, "" if mode == "eager" else mode) if d)
        label = f"{method} ({detail})" if detail else method
        # The modes of a series share colour, marker and dashes; compiled is drawn with hollow markers.
        if method == "none":
            colour, marker, dash = "black", "o", DASHES[nones.index(decoding) % len(DASHES)]
        else:
            colour, marker = style_of(method)
            dash = DASHES[greys.index(method) % len(DASHES)] if method in greys else "-"
        look = {"color": colour, "marker": marker, "ls": dash, "mfc": colour if mode == "eager" else "white"}
        if method != "none":
            speed_ax.plot(batches, [points[b]["speedup"] for b in batches], ms=4, lw=1.0, label=label, **look)
        rate_ax.plot(batches, [points[b]["tokens_per_s"] for b in batches], ms=4, lw=1.0, label=label, **look)
    speed_ax.axhline(1.0, color="black", lw=0.6, ls=":")
    speed_ax.set_ylim(bottom=0)
    speed_ax.set_ylabel("speedup over none (×)")
    speed_ax.set_title("speedup over none (same decoding and batch size)")
    rate_ax.set_yscale("log")
    for set_formatter in (rate_ax.yaxis.set_major_formatter, rate_ax.yaxis.set_minor_formatter):
        set_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 2)))  # 20, 30, 40 rather than 2x10^1
    rate_ax.set_ylabel("throughput (tokens / s)")
    rate_ax.set_title("throughput")
    for ax in (speed_ax, rate_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured batch sizes
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3, lw=0.5)
    first = rows[0]
    fig.suptitle(f"{first['preset']} preset · {first['device_name']} · {first['dtype']} · prompt {first['prompt_length']}, "
                 f"gen {first['gen_length']}")
    handles, labels = rate_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(5, len(labels)), frameon=False,
               handlelength=3)  # long enough to show each dash pattern
    return save(fig, out, "batch_scaling")


# ----------------------------------------------------------------------------------------------- trace
@contextmanager
def dllm_cache_layers():
    """Record, per step, how many layers recompute each position under dLLM-Cache's layer hook
    (the loop's trace only sees the rows that enter the layers)."""
    import torch

    from dllm.cache import dllm_cache

    counts: list = []
    begin, pick = dllm_cache.FeatureReuse.begin, dllm_cache.FeatureReuse.pick

    def recording_begin(self, rows, rows_valid, required):
        begin(self, rows, rows_valid, required)
        counts.append(torch.zeros(rows.shape[0], self.cache.ctx.length + 1))

    def recording_pick(self, layer, block, x_norm):
        picked = pick(self, layer, block, x_norm)
        counts[-1].scatter_add_(1, self.picked_positions.cpu(), torch.ones(self.picked_positions.shape))
        return picked

    dllm_cache.FeatureReuse.begin, dllm_cache.FeatureReuse.pick = recording_begin, recording_pick
    try:
        yield counts
    finally:
        dllm_cache.FeatureReuse.begin, dllm_cache.FeatureReuse.pick = begin, pick


def trace_runs(model: str, methods: list[str], gen_length: int, block_length: int, prompt: str) -> dict:
    """{method: (config, run plan)} of the recompute map's generations, every one composed and
    checked before the first runs: its settings, and its checkpoint's config.json (found, of the
    configured family, room for gen_length, a model the decoding and cache method can run; for a
    local checkpoint room for ``prompt`` too; no weights are read); ValueError (one line, a
    CheckpointError too) for a bad setting."""
    from hydra import compose, initialize_config_dir

    from dllm.pipeline import check_checkpoint, check_prompt_room, plan_run

    models, caches = (sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")) for group in ("model", "cache"))
    if model not in models:
        raise ValueError(f"--model {model!r}: no such model config (allowed: {', '.join(models)})")
    unknown = [method for method in methods if method not in caches]
    if unknown or not methods:
        raise ValueError(f"--methods: {f'unknown {unknown}' if unknown else 'empty'} "
                         f"(cache configs, comma-separated: {', '.join(caches)})")
    runs = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for method in methods:
            cfg = compose("config", overrides=[f"model={model}", f"cache={method}", f"gen_length={gen_length}", "device=cpu"])
            if "block_length" in cfg.decoding:
                cfg.decoding.block_length = block_length
            try:
                plan = plan_run(cfg)
                check_checkpoint(cfg, plan)  # the model itself: found, fits the methods and gen_length
                check_prompt_room(cfg, plan, [prompt])
                runs[method] = cfg, plan
            except ValueError as err:  # CheckpointError is one
                raise ValueError(f"--trace, cache {method}: {err}") from None
    return runs


def recompute_maps(runs: dict, prompt: str, seed: int = 0):
    """{method: (steps x positions fraction-of-layers map, prompt length)} for one generation each
    of :func:`trace_runs`'s runs."""
    import torch

    from dllm.decoding.loop import generate
    from dllm.models.tokenization import encode_prompts
    from dllm.pipeline import load_model_and_tokenizer

    maps, net = {}, None
    for method, (cfg, plan) in runs.items():
        if net is None:
            net, tokenizer = load_model_and_tokenizer(cfg, plan)
            ids = encode_prompts(tokenizer, [prompt], chat=bool(cfg.model.instruct))
        generator = torch.Generator().manual_seed(seed)
        with dllm_cache_layers() as layer_counts:
            out = generate(net, ids, plan.decoder, plan.cache, plan.gen_length, generator, record_trace=True)
        T = out.trace[0].shape[1]
        if layer_counts:  # a layer hook chose rows per layer: fraction of layers per position
            grid = torch.stack([c[0, :T] for c in layer_counts]) / net.args.n_layers
        else:
            grid = torch.stack([t[0].float() for t in out.trace])
        maps[method] = (grid.numpy(), T - plan.gen_length, out.recompute_ratio)
    return maps


def plot_recompute_map(maps: dict, out: Path, model: str) -> list[Path]:
    n = len(maps)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0, 2.4 * rows), squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, (method, (grid, prompt_length, ratio)) in zip(axes.flat, maps.items()):
        image = ax.imshow(grid.T, aspect="auto", origin="upper", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.axhline(prompt_length - 0.5, color=PROMPT_LINE, lw=1.0, ls="--")
        ax.set_title(f"{method}\n{ratio:.0%} of token-layers")
        ax.set_xlabel("denoising step")
        ax.spines[:].set_visible(True)
    for ax in axes[:, 0]:
        ax.set_ylabel("position")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(f"Positions recomputed at each step of one generation ({model}; prompt above the dashed line)")
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
        bar.set_label("fraction of layers recomputed")
    return save(fig, out, "recompute_map")


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", help="results CSV written by run.py")
    parser.add_argument("--out", default="outputs/figures",
                        help="folder for the PDF + PNG files (default outputs/figures; the committed ones: results/reference/figures)")
    parser.add_argument("--published", default=None, help="results/published.csv: the papers' points, faded")
    parser.add_argument("--experiment", default=None, help="only rows of this experiment")
    parser.add_argument("--bench-json", default=None,
                        help="JSON rows of scripts/bench.py (--batch-sizes): the batch_scaling figure")
    parser.add_argument("--trace", action="store_true", help="also draw the per-step recompute map (tiny model, CPU)")
    parser.add_argument("--model", default="tiny_llada", help="--trace: model config (default tiny_llada)")
    parser.add_argument("--methods", default=",".join(TRACE_METHODS), help="--trace: cache configs, comma-separated")
    parser.add_argument("--gen-length", type=int, default=64, help="--trace: response length")
    parser.add_argument("--block-length", type=int, default=16, help="--trace: block length of block decoders")
    parser.add_argument("--prompt", default=TRACE_PROMPT, help="--trace: the prompt")
    args = parser.parse_args(argv)
    if not args.csv and not args.trace and not args.bench_json:
        parser.error("give a results CSV, --bench-json, --trace, or several")
    for flag, value in (("--published", args.published), ("--experiment", args.experiment)):
        if value is not None and not args.csv:  # they only filter and fade a results CSV's points
            parser.error(f"{flag} {value!r} applies to a results CSV's figure: give the CSV too")
    written = []
    try:  # every input read and checked before the first figure is drawn
        if args.csv:
            runs = aggregate.load_runs(args.csv, args.experiment)
            plotted = [runs[c] if c in runs else pd.Series(dtype=float) for c in ("accuracy", "throughput_useful_tok_s")]
            if not (plotted[0].notna() & plotted[1].notna()).any():
                raise ValueError(f"{args.csv}: no ok row has both an accuracy and a throughput: nothing to plot")
            published = aggregate.load_published(args.published) if args.published else None
        bench_rows = load_bench_rows(args.bench_json) if args.bench_json else None
        if args.trace:
            if not args.prompt.strip():  # as run.py refuses prompt=''
                raise ValueError(f"--prompt {args.prompt!r}: an empty prompt (give the text to continue, "
                                 "e.g. --prompt 'What is 7 * 6?')")
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            trace = trace_runs(args.model, methods, args.gen_length, args.block_length, args.prompt)
        out = make_out_folder(args.out, files=tuple(f"{name}.{kind}" for name in FIGURES for kind in ("pdf", "png")))
    except ValueError as err:
        parser.error(str(err))
    if args.csv:
        tables = aggregate.build_tables(runs, published)
        written += plot_accuracy_vs_throughput(tables, out)
        written += plot_speedup(tables, out)
    if args.bench_json:
        written += plot_batch_scaling(bench_rows, out)
    if args.trace:
        written += plot_recompute_map(recompute_maps(trace, args.prompt), out, args.model)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
