"""Wall time and peak memory of a code region (CUDA-synchronised on GPU; peak RSS on CPU)."""
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


def _high_water_bytes() -> int:
    """The kernel's peak resident set size of this process (VmHWM) since its last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _high_water_bytes()
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_mem_gb: float = 0.0


class measure:
    """``with measure(device) as m: ...`` fills ``m.seconds`` and ``m.peak_mem_gb``.

    On CUDA, peak memory is ``max_memory_allocated`` during the region. On CPU it is the peak
    resident set size of the process during the region: exact on Linux, from the kernel's
    high-water mark reset at entry; elsewhere sampled every 2 ms by a background thread. (Such a
    thread competes with the compute threads for the cores: on 2 cores it slowed a cached
    generation by 2-5 %, so it is only the fallback.)
    """

    #: open CPU regions that read the high-water mark, innermost last: a nested region's reset
    #: must not lose the peak that the enclosing ones have already reached.
    _open: list["measure"] = []

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.result = Measurement()

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes()
            self._credit_high_water()
            self._sampler = None
            if _reset_high_water():
                measure._open.append(self)
            else:
                self._stop = threading.Event()
                self._sampler = threading.Thread(target=self._sample, daemon=True)
                self._sampler.start()
        self._t0 = time.perf_counter()
        return self.result

    @staticmethod
    def _credit_high_water() -> None:
        if measure._open:
            peak = _high_water_bytes()
            for region in measure._open:
                region._peak = max(region._peak, peak)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.seconds = time.perf_counter() - self._t0
            self.result.peak_mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
            return
        self.result.seconds = time.perf_counter() - self._t0
        if self._sampler is None:
            self._credit_high_water()
            measure._open.remove(self)
        else:
            self._stop.set()
            self._sampler.join()
        self.result.peak_mem_gb = max(self._peak, _rss_bytes()) / 2**30
