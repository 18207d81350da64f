"""Where a run computes and in what precision: the ``device`` and ``dtype`` settings, checked against
this machine. Needs torch alone (no config packages), so scripts/bench.py and scripts/gpu_check.py
use it on a bare PyTorch image too."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name) -> torch.device:
    """``device``: auto, cpu, or a GPU this machine has. torch.device also takes names that fail only
    once weights load (meta, mps, cpu:3, cuda:7 on a machine with fewer GPUs), so the name is checked
    against this machine's devices."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    allowed = ["auto", "cpu", *(["cuda"] if gpus else []), *gpus]
    if name not in allowed:
        raise ValueError(f"device={name!r} (allowed here: {allowed})")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} (allowed: auto, {', '.join(DTYPES)})")
    return DTYPES[name]
