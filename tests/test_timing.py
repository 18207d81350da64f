"""Peak memory and wall time of a region on CPU (dllm.metrics.timing)."""
from __future__ import annotations

import time

import pytest
import torch

from dllm.metrics import timing
from dllm.metrics.timing import measure

MB = 2**20
BLOCK = 256 * MB


def touch(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes // 4, dtype=torch.float32)  # written, so resident


def rss_gb() -> float:
    return timing._rss_bytes() / 2**30


@pytest.fixture(params=["high_water", "sampler"])
def strategy(request, monkeypatch):
    if request.param == "high_water" and not timing._reset_high_water():
        pytest.skip("this kernel cannot reset the high-water mark")
    if request.param == "sampler":
        monkeypatch.setattr(timing, "_reset_high_water", lambda: False)
    return request.param


def test_peak_counts_a_freed_allocation_and_resets_between_regions(strategy):
    before = rss_gb()
    with measure("cpu") as first:
        block = touch(BLOCK)
        time.sleep(0.05)  # the sampler's period is 2 ms
        del block
        time.sleep(0.01)
    assert first.seconds >= 0.05
    assert first.peak_mem_gb >= before + 0.9 * BLOCK / 2**30
    # The allocator may keep the freed block resident (late in a long test session it sometimes does):
    # the second region's baseline is what is resident when it starts.
    base = rss_gb()
    with measure("cpu") as second:
        time.sleep(0.01)
    assert second.peak_mem_gb < base + 0.5 * BLOCK / 2**30  # the earlier peak is not carried over


def test_a_nested_region_keeps_the_enclosing_peak(strategy):
    with measure("cpu") as outer:
        block = touch(BLOCK)
        time.sleep(0.05)
        del block
        with measure("cpu") as inner:
            time.sleep(0.01)
    base = rss_gb()
    assert outer.peak_mem_gb >= base + 0.9 * BLOCK / 2**30
    assert inner.peak_mem_gb < base + 0.5 * BLOCK / 2**30
