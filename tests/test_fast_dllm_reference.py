"""Fast-dLLM prefix/dual caches on Dream: our rows vs the reference's (``cache.dream_rows``).

Setting of the hand traces: prompts of 6 and 4 tokens (the second left-padded by 2), so P = 6;
gen 16 in blocks of 8, one token per step (16 steps), T = 22. Block 0 is [6, 14), block 1 [14, 22).
After a block's first (full) step:
- ours: the block's rows [lo, hi) (prefix: [lo, 22)) plus row lo - 1 while position lo is masked;
- reference (d2Cache's PrefixCache on Dream): [lo - 1, hi - 1) (prefix: [lo - 1, 21)), whatever
  is masked; the last position of the region keeps the block start's K/V.
On LLaDA both are the block region.
"""
from __future__ import annotations

import pytest
import torch

from dllm.cache.base import ActiveRequest, CacheMethod, StepView, build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate

from conftest import MASK_ID, compose, random_prompts, tiny_args, tiny_net

GEN, BLOCK, P, T = 16, 8, 6, 22
PROMPTS = random_prompts((6, 4))

# Hand-traced rows [a, b) of the non-full steps, per (family, method, dream_rows) and block.
FIXED_ROWS = {
    ("dream", "dual", "reference"): {0: (5, 13), 1: (13, 21)},
    ("dream", "prefix", "reference"): {0: (5, 21), 1: (13, 21)},
    ("dream", "dual", "ours"): {0: (6, 14), 1: (14, 22)},  # + row lo - 1 while lo is masked
    ("dream", "prefix", "ours"): {0: (6, 22), 1: (14, 22)},  # + row lo - 1 while lo is masked
    ("llada", "dual", "reference"): {0: (6, 14), 1: (14, 22)},
    ("llada", "prefix", "reference"): {0: (6, 22), 1: (14, 22)},
    ("llada", "dual", "ours"): {0: (6, 14), 1: (14, 22)},
    ("llada", "prefix", "ours"): {0: (6, 22), 1: (14, 22)},
}


class Recorder(CacheMethod):
    """Wraps a cache method; keeps each step's masked positions and request."""

    def __init__(self, inner: CacheMethod) -> None:
        self.inner, self.name, self.needs_attention = inner, inner.name, inner.needs_attention
        self.steps: list[tuple[torch.Tensor, ActiveRequest]] = []

    def check(self, decoder) -> None:
        self.inner.check(decoder)

    def start(self, ctx) -> None:
        super().start(ctx)
        self.inner.start(ctx)

    def select(self, view: StepView) -> ActiveRequest:
        request = self.inner.select(view)
        self.steps.append((view.masked.clone(), request))
        return request

    def observe(self, view, outcome) -> None:
        self.inner.observe(view, outcome)


def net_of(family: str):
    return tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))


def run(family: str, method: str, dream_rows: str, **params):
    rec = Recorder(build_cache(method, dream_rows=dream_rows, **params))
    out = generate(net_of(family), PROMPTS, build_decoder("low_confidence", steps=GEN, block_length=BLOCK), rec, GEN,
                   record_trace=True)
    return out, rec


def rows(a: int, b: int) -> torch.Tensor:
    expected = torch.zeros(2, T, dtype=torch.bool)
    expected[:, a:b] = True
    return expected


@pytest.mark.parametrize("dream_rows", ["ours", "reference"])
@pytest.mark.parametrize("method", ["prefix", "dual"])
def test_active_rows_hand_traced(family, method, dream_rows):
    out, rec = run(family, method, dream_rows)
    assert len(out.trace) == GEN and not (out.tokens == MASK_ID).any()
    lo_masked_seen = {True: 0, False: 0}  # the non-full steps where position lo is (not) masked
    for step, (active, (masked, request)) in enumerate(zip(out.trace, rec.steps)):
        block, block_step = divmod(step, BLOCK)
        if block_step == 0:
            assert request.full and active.all(), f"step {step}: block start is a full forward"
            continue
        assert not request.full
        lo = P + block * BLOCK
        expected = rows(*FIXED_ROWS[family, method, dream_rows][block])
        if family == "dream" and dream_rows == "ours":
            expected[:, lo - 1] = masked[:, lo]
        for row in range(2):
            lo_masked_seen[bool(masked[row, lo])] += 1
        assert torch.equal(active, expected), f"step {step}: rows {active.nonzero().tolist()}"
        # The request itself: fresh predictions for the masked positions of the region.
        end = T if method == "prefix" else lo + BLOCK
        region = rows(lo, end)
        assert torch.equal(request.predict, masked & region)
        if family == "dream" and dream_rows == "reference":
            assert torch.equal(request.refresh, rows(lo - 1, end - 1))
        else:
            assert torch.equal(request.refresh, region)
    # Both cases occur, so the lo - 1 rule is exercised either way.
    assert lo_masked_seen[True] and lo_masked_seen[False]


def test_reference_rows_differ_from_ours_only_on_dream():
    """Dream: the reference keeps row lo - 1 once lo is decoded and drops the region's last row, so
    the traces differ; LLaDA: the reference's rows are ours, tokens and all."""
    for method in ("prefix", "dual"):
        ours, _ = run("dream", method, "ours")
        ref, _ = run("dream", method, "reference")
        assert any(not torch.equal(a, b) for a, b in zip(ours.trace, ref.trace))
        # the region's last row (dual: hi - 1; prefix: T - 1) is never recomputed after a block start
        for step, active in enumerate(ref.trace):
            if step % BLOCK:
                hi = P + (step // BLOCK + 1) * BLOCK
                assert not active[:, (T if method == "prefix" else hi) - 1].any()
                assert active[:, P + (step // BLOCK) * BLOCK - 1].all()
        ours, _ = run("llada", method, "ours")
        ref, _ = run("llada", method, "reference")
        assert torch.equal(ours.tokens, ref.tokens)
        assert all(torch.equal(a, b) for a, b in zip(ours.trace, ref.trace))


def test_reference_rows_with_refresh_interval(family):
    """refresh_interval=3: block steps 0, 3, 6 are full; the others use the reference's rows."""
    out, _ = run(family, "dual", "reference", refresh_interval=3)
    shift = 1 if family == "dream" else 0
    for step, active in enumerate(out.trace):
        block, block_step = divmod(step, BLOCK)
        if block_step % 3 == 0:
            assert active.all(), f"step {step}"
        else:
            lo = P + block * BLOCK
            assert torch.equal(active, rows(lo - shift, lo + BLOCK - shift)), f"step {step}"


@pytest.mark.parametrize("method", ["prefix", "dual"])
@pytest.mark.parametrize("decoding", ["low_confidence", "threshold"])
def test_reference_rows_refresh_every_step_reproduces_none(family, method, decoding):
    make = {
        "low_confidence": lambda: build_decoder("low_confidence", steps=GEN, block_length=BLOCK),
        "threshold": lambda: build_decoder("threshold", block_length=BLOCK, threshold=0.3),
    }[decoding]
    net = net_of(family)
    prompts = random_prompts((7, 3, 10))
    base = generate(net, prompts, make(), build_cache("none"), GEN)
    forced = generate(net, prompts, make(), build_cache(method, refresh_interval=1, dream_rows="reference"), GEN)
    assert torch.equal(forced.tokens, base.tokens)
    assert forced.recompute_ratio == 1.0


@pytest.mark.parametrize("method", ["prefix", "dual"])
def test_bad_dream_rows_refused(method):
    for bad in ("shifted", "Reference", None, True):
        with pytest.raises(ValueError, match=r"cache\.dream_rows=.*allowed: \['ours', 'reference'\]"):
            build_cache(method, dream_rows=bad)


@pytest.mark.parametrize("method", ["prefix", "dual"])
def test_config_default_is_ours(method):
    cfg = compose(f"cache={method}")
    assert cfg.cache.dream_rows == "ours"
    assert build_cache(method).dream_rows == "ours"
