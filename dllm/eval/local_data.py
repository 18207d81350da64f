"""Loading the jsonl files that ship beside a task's YAML (offline twins, ``arith``)."""
from __future__ import annotations

import json
from pathlib import Path


def load_jsonl_splits(data_dir: Path, prefix: str | None, rebuild_hint: str):
    """A DatasetDict of every ``<data_dir>/<prefix>_<split>.jsonl``.

    Task folders call this from their utils.py with a path built from that file's own location:
    lm-eval resolves ``dataset_kwargs.data_files`` against the working directory instead.
    """
    import datasets

    if not prefix:
        raise ValueError("the task YAML needs dataset_kwargs.local_data (the data file prefix)")
    files = sorted(Path(data_dir).glob(f"{prefix}_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no {data_dir}/{prefix}_<split>.jsonl (run {rebuild_hint})")
    splits = {}
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        splits[path.stem[len(prefix) + 1 :]] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
