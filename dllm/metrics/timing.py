"""Wall time and peak memory of a code region (CUDA-synchronised; RSS-sampled on CPU)."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_mem_gb: float = 0.0


class measure:
    """``with measure(device) as m: ...`` fills ``m.seconds`` and ``m.peak_mem_gb``.

    On CUDA, peak memory is ``max_memory_allocated`` during the region; on CPU it is the peak
    resident set size of the process, sampled every 2 ms by a background thread.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.result = Measurement()

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self.result

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.seconds = time.perf_counter() - self._t0
            self.result.peak_mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.result.seconds = time.perf_counter() - self._t0
            self._stop.set()
            self._thread.join()
            self.result.peak_mem_gb = max(self._peak, _rss_bytes()) / 2**30
