"""Data hook of the ``arith`` task (lm-eval imports this file by path).

The path is built from this file's location: lm-eval resolves ``dataset_kwargs.data_files``
against the working directory, so a plain ``dataset_path: json`` would break outside the repo root.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def load_local(local_data: str | None = None, **_ignored):
    """A DatasetDict of every ``data/<local_data>_<split>.jsonl`` (custom_dataset hook)."""
    import datasets

    if not local_data:
        raise ValueError("the arith task YAML needs dataset_kwargs.local_data (the data file prefix)")
    files = sorted(DATA.glob(f"{local_data}_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no {DATA}/{local_data}_<split>.jsonl (run python -m dllm.eval.arith_data)")
    splits = {}
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        splits[path.stem[len(local_data) + 1 :]] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
