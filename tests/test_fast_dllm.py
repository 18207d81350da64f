"""Fast-dLLM baselines: prefix/dual caches and confidence-threshold parallel decoding."""
from __future__ import annotations

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import StepPlan, build_decoder
from dllm.decoding.loop import generate

from conftest import MASK_ID, random_prompts, tiny_args, tiny_net, with_weights

GEN, BLOCK = 16, 8


def decoders():
    return {
        "low_confidence": lambda: build_decoder("low_confidence", steps=GEN, block_length=BLOCK),
        "threshold": lambda: build_decoder("threshold", block_length=BLOCK, threshold=0.3),
    }


@pytest.mark.parametrize("method", ["prefix", "dual"])
@pytest.mark.parametrize("decoding", ["low_confidence", "threshold"])
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_refresh_every_step_reproduces_none(family, weights, method, decoding, lengths):
    net = with_weights(tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,)), weights)
    prompts = random_prompts(lengths)
    make = decoders()[decoding]
    base = generate(net, prompts, make(), build_cache("none"), GEN)
    forced = generate(net, prompts, make(), build_cache(method, refresh_interval=1), GEN)
    assert torch.equal(forced.tokens, base.tokens)
    assert forced.recompute_ratio == 1.0


class Recording:
    """Wraps a cache method and keeps the still-masked positions seen at each step."""

    def __init__(self, inner):
        self.inner, self.masked = inner, []
        self.needs_attention = inner.needs_attention

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def select(self, view):
        self.masked.append(view.masked.clone())
        return self.inner.select(view)


@pytest.mark.parametrize("method,suffix", [("prefix", True), ("dual", False)])
def test_active_sets_hand_traced(family, method, suffix):
    """Prompt 6, gen 16, blocks of 8, one token per step, batch of 2 (one row left-padded by 2)."""
    net = tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))
    cache = Recording(build_cache(method))
    out = generate(net, random_prompts((6, 4)), build_decoder("low_confidence", steps=GEN, block_length=BLOCK),
                   cache, GEN, record_trace=True)
    P, T = 6, 22
    for step, (active, masked) in enumerate(zip(out.trace, cache.masked)):
        block, block_step = divmod(step, BLOCK)
        if block_step == 0:  # block start: full forward
            assert active.all()
            continue
        lo = P + block * BLOCK
        expected = torch.zeros(2, T, dtype=torch.bool)
        expected[:, lo : T if suffix else lo + BLOCK] = True
        if family == "dream":  # the block's first position is predicted from lo - 1 while it is masked
            expected[:, lo - 1] = masked[:, lo]
        assert torch.equal(active, expected), f"step {step}"


def plan_with(n: list[int]) -> StepPlan:
    return StepPlan((0, 6), torch.tensor(n), 0, 0)


def test_threshold_rule_hand_cases():
    dec = build_decoder("threshold", block_length=8, threshold=0.9)
    inf = float("-inf")
    score = torch.tensor([
        [0.95, 0.2, 0.91, inf, 0.5, inf],  # two above 0.9
        [0.3, 0.1, inf, inf, 0.2, inf],  # none above: the most confident one
        [inf, inf, inf, inf, inf, inf],  # nothing eligible: nothing
    ], dtype=torch.float64)
    chosen = dec.select(score, plan_with([1, 1, 0]))
    assert chosen.tolist() == [
        [True, False, True, False, False, False],
        [True, False, False, False, False, False],
        [False] * 6,
    ]


def test_factor_rule_hand_case():
    # factor 1: the n-th most confident token is taken while c_(n) >= 1 - 1/(n+1): 0.5, 0.667, 0.75, ...
    dec = build_decoder("threshold", block_length=8, factor=1.0)
    inf = float("-inf")
    score = torch.tensor([
        [0.4, 0.7, 0.8, inf, 0.66, inf],  # sorted 0.8 (first: always), 0.7 >= 0.667, 0.66 < 0.75 -> 2
        [0.1, 0.2, inf, inf, inf, inf],  # sorted 0.2 (always), 0.1 < 0.667 -> 1
    ], dtype=torch.float64)
    chosen = dec.select(score, plan_with([1, 1]))
    assert chosen.tolist() == [
        [False, True, True, False, False, False],
        [False, True, False, False, False, False],
    ]


def test_threshold_decoding_finishes_blocks_in_order_with_fewer_forwards(family):
    net = tiny_net(tiny_args(family), logit_scale=30.0, silent_ids=(MASK_ID,))
    out = generate(net, random_prompts((5, 9)), build_decoder("threshold", block_length=BLOCK, threshold=0.5),
                   build_cache("none"), GEN, record_trace=True)
    assert not (out.tokens == MASK_ID).any()
    assert out.nfe < GEN, "peaked predictions commit several tokens per forward"


def test_bad_threshold_settings():
    with pytest.raises(ValueError, match="threshold=1.5"):
        build_decoder("threshold", threshold=1.5)
    with pytest.raises(ValueError, match="factor=0"):
        build_decoder("threshold", factor=0)
    with pytest.raises(ValueError, match="refresh_interval=0"):
        build_cache("dual", refresh_interval=0)
    with pytest.raises(ValueError, match="gen_length=20 is not divisible by block_length=8"):
        build_decoder("threshold", block_length=8).check(20)


COMPOSABLE = ["none", "dkv_decode", "d2cache", "prefix", "dual", "dllm_cache"]


@pytest.mark.parametrize("method", COMPOSABLE)
def test_threshold_decoding_composes_with_cache_methods(family, method):
    """Parallel decoding under every cache method that can run it: the response is fully decoded,
    and with the method's refresh forced every step the tokens are none's."""
    net = tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))
    prompts = random_prompts((6, 9))
    make = lambda: build_decoder("threshold", block_length=BLOCK, threshold=0.3)  # noqa: E731
    out = generate(net, prompts, make(), build_cache(method), GEN)
    assert not (out.tokens == MASK_ID).any() and out.nfe < GEN
    forced = {"dkv_decode": dict(refresh_interval=1), "d2cache": dict(refresh_interval=1),
              "prefix": dict(refresh_interval=1), "dual": dict(refresh_interval=1),
              "dllm_cache": dict(prompt_interval=1, response_interval=1)}.get(method, {})
    base = generate(net, prompts, make(), build_cache("none"), GEN)
    assert torch.equal(generate(net, prompts, make(), build_cache(method, **forced), GEN).tokens, base.tokens)


def test_dkv_greedy_refuses_threshold_decoding():
    """dKV-Cache-Greedy needs the step's positions before the forward; threshold picks them after."""
    with pytest.raises(ValueError, match="threshold"):
        build_cache("dkv_greedy").check(build_decoder("threshold", block_length=BLOCK))
