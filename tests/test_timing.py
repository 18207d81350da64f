"""Peak memory and wall time of a region on CPU (dllm.metrics.timing)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dllm.metrics import timing

BLOCK = 256 * 2**20


@pytest.fixture(params=["high_water", "sampler"])
def strategy(request):
    """How the peak is read: the kernel's resettable high-water mark, or the sampling thread."""
    if request.param == "high_water" and not timing._reset_high_water():
        pytest.skip("this kernel cannot reset the high-water mark")
    return request.param


# The peak tests run in a fresh interpreter: late in a long test session the allocator may hold
# freed memory resident and hand it back to a new 256 MB tensor without touching new pages, so the
# resident set (what a peak is made of) would not grow at all.
SCENARIOS = r"""
import json, sys, time
import torch
from dllm.metrics import timing
from dllm.metrics.timing import measure

strategy, scenario, block = sys.argv[1], sys.argv[2], int(sys.argv[3])
if strategy == "sampler":
    timing._reset_high_water = lambda: False
rss = lambda: timing._rss_bytes() / 2**30
before = rss()
with measure("cpu") as first:
    tensor = torch.ones(block // 4, dtype=torch.float32)  # written, so resident
    time.sleep(0.05)  # the sampler's period is 2 ms
    del tensor
    if scenario == "nested":
        with measure("cpu") as inner:
            time.sleep(0.01)
    else:
        time.sleep(0.01)
base = rss()
if scenario == "sequential":
    with measure("cpu") as inner:
        time.sleep(0.01)
print(json.dumps(dict(before=before, first=first.peak_mem_gb, seconds=first.seconds, base=base, inner=inner.peak_mem_gb)))
"""


def run_scenario(strategy: str, scenario: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCENARIOS, strategy, scenario, str(BLOCK)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_peak_counts_a_freed_allocation_and_resets_between_regions(strategy):
    got = run_scenario(strategy, "sequential")
    assert got["seconds"] >= 0.05
    assert got["first"] >= got["before"] + 0.9 * BLOCK / 2**30
    assert got["inner"] < got["base"] + 0.5 * BLOCK / 2**30  # the earlier peak is not carried over


def test_a_nested_region_keeps_the_enclosing_peak(strategy):
    got = run_scenario(strategy, "nested")
    assert got["first"] >= got["before"] + 0.9 * BLOCK / 2**30
    assert got["inner"] < got["base"] + 0.5 * BLOCK / 2**30
