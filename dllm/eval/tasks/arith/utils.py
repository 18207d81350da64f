"""Data hook of the ``arith`` task (lm-eval imports this file by path).

The path is built from this file's location: lm-eval resolves ``dataset_kwargs.data_files``
against the working directory, so a plain ``dataset_path: json`` would break outside the repo root.
"""
from __future__ import annotations

from pathlib import Path

from dllm.eval.local_data import load_jsonl_splits

DATA = Path(__file__).resolve().parent / "data"


def load_local(local_data: str | None = None, **_ignored):
    """A DatasetDict of every ``data/<local_data>_<split>.jsonl`` (custom_dataset hook)."""
    return load_jsonl_splits(DATA, local_data, "python -m dllm.eval.arith_data")
