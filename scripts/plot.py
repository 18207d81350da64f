"""Paper figures from a results CSV, and the per-step recompute map of every cache method.

    python scripts/plot.py results/runs.csv --out results/figures              # from a sweep's rows
    python scripts/plot.py --trace --out results/figures                       # tiny model, one generation
    python scripts/plot.py results/runs.csv --published results/published.csv # + the papers' points

Every figure is written as PDF (vector, fonts embedded) and PNG. Colours are fixed per cache
method across all figures (``METHOD_COLOURS``).

- ``accuracy_vs_throughput``: one panel per table of scripts/aggregate.py (model, task, setting):
  accuracy (%) against useful tokens per second, one point per method, the Pareto front (no other
  method is both faster and more accurate) drawn as a line through ringed points.
- ``speedup``: one panel per (task, setting): bars per model and method, the measured speedup over
  ``none`` (generation time ratio) with the ideal speedup (1 / recompute ratio) as a tick.
- ``recompute_map`` (``--trace``): positions x denoising steps, one panel per method: the fraction
  of layers that recompute each position at each step, for one generation of the tiny model
  (``generate(..., record_trace=True)``; dLLM-Cache's per-layer choices are recorded from its layer hook).
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aggregate  # noqa: E402

METHOD_COLOURS = {
    "none": "#4d4d4d",
    "dkv_decode": "#1f77b4",
    "dkv_greedy": "#ff7f0e",
    "d2cache": "#d62728",
    "prefix": "#2ca02c",
    "dual": "#17becf",
    "dllm_cache": "#9467bd",
}
OTHER_COLOURS = ["#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P"]
HATCHES = ["", "//", "..", "xx", "\\\\"]
TRACE_METHODS = ["none", "dkv_decode", "dkv_greedy", "d2cache", "prefix", "dual", "dllm_cache"]
TRACE_PROMPT = "Question: Tom has 9 marbles. He buys 3 more and loses 5. How many marbles does Tom have now?\nAnswer:"

plt.rcParams.update({
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "pdf.fonttype": 42, "ps.fonttype": 42,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 200,
})


def colour_of(cache: str) -> str:
    if cache in METHOD_COLOURS:
        return METHOD_COLOURS[cache]
    return OTHER_COLOURS[sum(map(ord, cache)) % len(OTHER_COLOURS)]


def save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return paths


def _grid(n: int, width: float = 7.0, height: float = 2.4, cols: int = 3):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width if cols > 1 else 3.4, height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


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
    fig, axes = _grid(len(tables))
    handles = {}
    for ax, (key, table) in zip(axes, tables):
        table = table.dropna(subset=["accuracy", "tok/s"])
        variants = _variants(table)
        points = list(zip(table["tok/s"], table["accuracy"]))
        for (x, y), cache, label in zip(points, table["cache"], table["method"]):
            h = ax.scatter(x, y, s=28, color=colour_of(cache), marker=MARKERS[variants[label] % len(MARKERS)], zorder=3)
            handles.setdefault(label, h)
        front = pareto_front(points)
        if front:
            xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
            line = ax.plot(xs, ys, color="black", lw=0.8, ls="--", zorder=2)[0]
            ring = ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="black", lw=0.8, zorder=4)
            handles.setdefault("Pareto front", (line, ring))
        if "paper acc" in table and table["paper acc"].notna().any():
            paper = table.dropna(subset=["paper acc", "paper tok/s"])
            for x, y, cache in zip(paper["paper tok/s"], paper["paper acc"], paper["cache"]):
                h = ax.scatter(x, y, s=28, facecolors="none", edgecolors=colour_of(cache), marker="o", zorder=3)
                handles.setdefault("published (hollow)", h)
        ax.set_title(f"{key['model']} · {key['task']}\n{aggregate.setting_text(key)}")
        ax.set_xlabel("throughput (useful tokens / s)")
        ax.set_ylabel("accuracy (%)")
        ax.margins(x=0.15, y=0.15)
        ax.grid(alpha=0.3, lw=0.5)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside upper center", ncol=min(4, len(handles)), frameon=False)
    return save(fig, out, "accuracy_vs_throughput")


def plot_speedup(tables, out: Path) -> list[Path]:
    panels: dict[tuple, list] = {}
    for key, table in tables:
        setting = {k: v for k, v in key.items() if k != "model"}
        panels.setdefault(tuple(sorted(setting.items())), []).append((key, table))
    fig, axes = _grid(len(panels))
    handles = {}
    for ax, (setting, entries) in zip(axes, panels.items()):
        labels = []  # every method label of the panel, in table order
        for _, table in entries:
            labels += [label for label in table["method"] if label not in labels]
        width = 0.8 / max(1, len(labels))
        for m, (key, table) in enumerate(entries):
            variants = _variants(table)
            rows = {label: row for label, row in zip(table["method"], table.to_dict("records"))}
            for i, label in enumerate(labels):
                row = rows.get(label)
                if row is None or row["speedup"] is None or pd.isna(row["speedup"]):
                    continue
                x = m + (i - (len(labels) - 1) / 2) * width
                bar = ax.bar(x, row["speedup"], width * 0.92, color=colour_of(row["cache"]),
                             hatch=HATCHES[variants[label] % len(HATCHES)], edgecolor="white", lw=0.3, zorder=3)
                handles.setdefault(label, bar)
                ax.text(x, row["speedup"], f"{row['speedup']:.2f}", ha="center", va="bottom", fontsize=6)
                if row["ideal"] is not None and not pd.isna(row["ideal"]):
                    tick = ax.scatter(x, row["ideal"], marker="_", s=60, color="black", lw=1.2, zorder=4)
                    handles.setdefault("ideal (1 / recompute ratio)", tick)
        ax.axhline(1.0, color="black", lw=0.6, ls=":")
        ax.set_xticks(range(len(entries)), [key["model"] for key, _ in entries])
        first = entries[0][0]
        ax.set_title(f"{first['task']}\n{aggregate.setting_text(first)}")
        ax.set_ylabel("speedup over none (×)")
        ax.set_xlabel("model")
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside upper center", ncol=min(4, len(handles)), frameon=False)
    return save(fig, out, "speedup")


# ----------------------------------------------------------------------------------------------- trace
@contextmanager
def dllm_cache_layers():
    """Record, per step, how many layers recompute each position under dLLM-Cache's layer hook
    (the loop's trace only sees the rows that enter the layers)."""
    import torch

    from dllm.cache import dllm_cache

    counts: list = []
    begin, pick = dllm_cache.FeatureReuse.begin, dllm_cache.FeatureReuse.pick

    def recording_begin(self, rows, rows_valid):
        begin(self, rows, rows_valid)
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


def recompute_maps(model: str, methods: list[str], gen_length: int, block_length: int, prompt: str, seed: int = 0):
    """{method: (steps x positions fraction-of-layers map, prompt length)} for one generation each."""
    import torch
    from hydra import compose, initialize_config_dir

    from dllm.decoding.loop import generate
    from dllm.models.tokenization import encode_prompts
    from dllm.pipeline import load_model_and_tokenizer, plan_run

    maps, net = {}, None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for method in methods:
            cfg = compose("config", overrides=[f"model={model}", f"cache={method}", f"gen_length={gen_length}", "device=cpu"])
            if "block_length" in cfg.decoding:
                cfg.decoding.block_length = block_length
            plan = plan_run(cfg)
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
            maps[method] = (grid.numpy(), T - gen_length, out.recompute_ratio)
    return maps


def plot_recompute_map(maps: dict, out: Path, model: str) -> list[Path]:
    n = len(maps)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.0, 2.4 * rows), squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, (method, (grid, prompt_length, ratio)) in zip(axes.flat, maps.items()):
        image = ax.imshow(grid.T, aspect="auto", origin="upper", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.axhline(prompt_length - 0.5, color=colour_of(method), lw=1.0, ls="--")
        ax.set_title(f"{method}\n{ratio:.0%} of token-layers", color=colour_of(method))
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
    parser.add_argument("--out", default="results/figures", help="folder for the PDF + PNG files")
    parser.add_argument("--published", default=None, help="results/published.csv: the papers' points, hollow")
    parser.add_argument("--experiment", default=None, help="only rows of this experiment")
    parser.add_argument("--trace", action="store_true", help="also draw the per-step recompute map (tiny model, CPU)")
    parser.add_argument("--model", default="tiny_llada", help="--trace: model config (default tiny_llada)")
    parser.add_argument("--methods", default=",".join(TRACE_METHODS), help="--trace: cache configs, comma-separated")
    parser.add_argument("--gen-length", type=int, default=64, help="--trace: response length")
    parser.add_argument("--block-length", type=int, default=16, help="--trace: block length of block decoders")
    parser.add_argument("--prompt", default=TRACE_PROMPT, help="--trace: the prompt")
    args = parser.parse_args(argv)
    if not args.csv and not args.trace:
        parser.error("give a results CSV, --trace, or both")
    out, written = Path(args.out), []
    if args.csv:
        runs = aggregate.load_runs(args.csv, args.experiment)
        published = aggregate.load_published(args.published) if args.published else None
        tables = aggregate.build_tables(runs, published)
        written += plot_accuracy_vs_throughput(tables, out)
        written += plot_speedup(tables, out)
    if args.trace:
        methods = [m for m in args.methods.split(",") if m]
        maps = recompute_maps(args.model, methods, args.gen_length, args.block_length, args.prompt)
        written += plot_recompute_map(maps, out, args.model)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
