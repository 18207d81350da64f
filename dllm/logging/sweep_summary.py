"""What a sweep found, printed when it ends (a Hydra callback, conf/config.yaml ``hydra.callbacks``).

``python run.py -m ...`` otherwise ends silently after its last job. At the end of a multirun
(basic, local or SLURM launcher: Hydra calls it on the submitting machine once every job is
done) this prints one table of the rows the sweep's jobs wrote to ``results_csv`` — method,
accuracy ± stderr, tok/s, speedup over the ``none`` row of the same workload (model, task, shots,
limit, response length, batch size, hardware, dtype, threads, processes) when the sweep has one
(the same decoding and decoding settings, else the workload's one low-confidence ``none``), status
— and the CSV's path. A CSV that cannot be read is named with the way to repair it. A SLURM sweep
also says, at its start, where the rows will arrive and how to watch them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def sweep_rows(csv_path: Path, sweep_dir: Path) -> list[dict]:
    """The rows of ``csv_path`` whose run folder lies under ``sweep_dir`` (the sweep's own jobs)."""
    import pandas as pd

    if not csv_path.is_file():
        return []
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        print(f"cannot read {csv_path} ({str(err).splitlines()[0]}); python scripts/repair_csv.py {csv_path} "
              "moves unreadable rows aside")
        return []
    if "run_dir" not in frame:
        return []
    root = sweep_dir.resolve()
    mine = [Path(d).resolve().is_relative_to(root) if d else False for d in frame["run_dir"]]
    return frame[mine].to_dict("records")


# A row's none baseline did the same work on the same machine and settings: same model, task, shots,
# samples, response length, batch, device, dtype, threads and processes.
SAME_WORKLOAD = ("model", "task", "n_shot", "limit", "gen_length", "batch_size", "device", "gpu_name", "dtype",
                 "threads", "processes")


def summary_table(rows: list[dict]) -> str:
    """Plain-text table, one line per row; speedup against the sweep's ``none`` row of the same
    workload (``SAME_WORKLOAD``), decoding and decoding settings (``decoding.*`` columns: steps,
    block length ...), else the workload's low-confidence ``none`` row if it has exactly one."""
    def workload(r: dict) -> tuple:
        return tuple(str(r.get(key, "")) for key in SAME_WORKLOAD)

    def decoding(r: dict) -> tuple:
        return r["decoding"], tuple(sorted((k, str(v)) for k, v in r.items() if k.startswith("decoding.")))

    nones = [r for r in rows if r["cache"] == "none"]

    def baseline(r: dict) -> float | None:
        same = [n for n in nones if workload(n) == workload(r)]
        own = [n for n in same if decoding(n) == decoding(r)]
        low_confidence = [n for n in same if n["decoding"] == "low_confidence"]
        base = own[-1] if own else low_confidence[0] if len(low_confidence) == 1 else None
        return None if base is None else _float(base.get("throughput_all_tok_s"))

    header = (f"{'model':<14} {'task':<12} {'gen':>5} {'cache':<12} {'decoding':<16} {'accuracy':>16} {'tok/s':>9} "
              f"{'speedup':>8}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        acc, err = _float(r.get("accuracy")), _float(r.get("accuracy_stderr"))
        accuracy = "n/a" if acc is None else f"{100 * acc:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")
        tok_s = _float(r.get("throughput_useful_tok_s"))
        none_all, own_all = baseline(r), _float(r.get("throughput_all_tok_s"))
        speedup = f"{own_all / none_all:.2f}x" if none_all and own_all else "—"
        lines.append(
            f"{r['model']:<14} {r['task']:<12} {r.get('gen_length', ''):>5} {r['cache']:<12} {r['decoding']:<16} {accuracy:>16} "
            f"{'n/a' if tok_s is None else f'{tok_s:.1f}':>9} {speedup:>8}  {r.get('status', '')}"
        )
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if "slurm" in launcher.lower():
            csv_path = Path(str(config.results_csv)).resolve()
            print(
                f"SLURM sweep: each job appends its row to {csv_path} when it finishes; watch them arrive with\n"
                f"  squeue --me    and    python scripts/aggregate.py {csv_path}\n"
                f"job logs: {Path(str(config.hydra.sweep.dir)).resolve()}/.submitit/<job id>/"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        csv_path = Path(str(config.results_csv)).resolve()
        rows = sweep_rows(csv_path, Path(str(config.hydra.sweep.dir)))
        print(f"\nsweep done: {len(rows)} row(s) written to {csv_path} (jobs that failed or were skipped as existing wrote none)")
        if rows:
            print(summary_table(rows))
