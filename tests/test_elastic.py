"""Elastic-Cache: gamma = 1 with a window over the response is cache=none; the drift test and its
boundary by hand; the sliding window keeps off-window masks out of the forward; no [MASK] left."""
from __future__ import annotations

import math

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.cache.elastic import NO_REFRESH, ElasticCache, drift_boundary, leftmost
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import generate

from conftest import MASK_ID, Recorder, random_prompts, tiny_args, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")
GEN = 16


def net_of(family: str):
    return tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))


@pytest.mark.parametrize("decoding", [dict(name="low_confidence", steps=GEN, block_length=8),
                                      dict(name="threshold", block_length=None, threshold=0.5)], ids=["blocks", "threshold"])
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_gamma_one_reproduces_none(family, lengths, decoding):
    net, prompts = net_of(family), random_prompts(lengths)
    base = generate(net, prompts, build_decoder(**decoding), build_cache("none"), GEN)
    elastic = generate(net, prompts, build_decoder(**decoding), build_cache("elastic", gamma=1.0, window=GEN), GEN)
    assert torch.equal(elastic.tokens, base.tokens)
    assert elastic.nfe == base.nfe


def test_drift_boundary_by_hand():
    boundary = torch.tensor([NO_REFRESH, NO_REFRESH, 1])
    # row 0 drifted (0.5 < 0.9), row 1 did not, row 2 already refreshes from layer 2: unchanged.
    assert drift_boundary(torch.tensor([0.5, 0.95, 0.1]), 0.9, boundary, 3).tolist() == [3, NO_REFRESH, 1]
    # the test is strict: equal to gamma is no drift
    assert drift_boundary(torch.tensor([0.9]), 0.9, torch.tensor([NO_REFRESH]), 0).tolist() == [NO_REFRESH]


def test_similarity_and_tracked_token_by_hand():
    """One batch row, T = 4 (prompt 0, 1; masked 2, 3); window rows 2 and 3 attend over 5 slots
    (the last one the trash slot)."""
    T = 4
    real = torch.ones(1, T, dtype=torch.bool)
    ctx = DecodeContext(1, 2, 2, MASK_ID, real, None, torch.device("cpu"), 0)
    cache = ElasticCache(gamma=0.9, window=2)
    cache.start(ctx)
    cache.known = torch.tensor([[True, True, False, False]])
    positions, rows = torch.tensor([[2, 3]]), torch.tensor([[True, True]])
    before = torch.tensor([[[0.6, 0.1, 0.2, 0.1, 0.0], [0.5, 0.3, 0.1, 0.1, 0.0]]])
    cache.track(0, before, positions, rows)
    # column sums over known keys: key 0 gets 1.1, key 1 gets 0.4 -> T_0 = 0
    assert cache.tracked[0].tolist() == [0]
    assert torch.allclose(cache.prev_column[0], torch.tensor([[0, 0, 0.6, 0.5, 0]], dtype=torch.float64))
    now = torch.tensor([[[0.1, 0.7, 0.1, 0.1, 0.0], [0.5, 0.3, 0.1, 0.1, 0.0]]])
    sigma = cache.similarity(0, now, positions, rows)
    expected = (0.6 * 0.1 + 0.5 * 0.5) / (math.hypot(0.6, 0.5) * math.hypot(0.1, 0.5))  # = 0.7206
    assert sigma.item() == pytest.approx(expected)
    assert drift_boundary(sigma, 0.9, torch.tensor([NO_REFRESH]), 0).tolist() == [0]
    # the token the window attends to most now is known key 1; a row without history rows: sigma 1
    cache.track(0, now, positions, rows)
    assert cache.tracked[0].tolist() == [1]
    assert cache.similarity(0, now, positions, torch.zeros_like(rows)).tolist() == [1.0]


def test_leftmost_window():
    masked = torch.tensor([[False, True, True, False, True, True]])
    assert leftmost(masked, 3).tolist() == [[False, True, True, False, True, False]]


@pytest.mark.parametrize("gamma", [0.0, 0.99])
def test_off_window_masks_stay_out_of_the_forward(gamma):
    """Step 0 computes everything; afterwards masked positions beyond the window of 2 are never
    computed (LLaDA: no shift), whatever gamma decides for the known rows."""
    recorder = Recorder(build_cache("elastic", gamma=gamma, window=2))
    decoder = build_decoder("threshold", block_length=None, threshold=0.5)
    out = generate(net_of("llada"), random_prompts((7, 3)), decoder, recorder, GEN)
    first, *rest = recorder.steps
    assert first["active"][:, -GEN:].all()
    assert rest
    for step in rest:
        masked = step["masked"]
        assert not (step["active"] & masked & ~leftmost(masked, 2)).any()
        assert (step["active"] & leftmost(masked, 2)).sum() == leftmost(masked, 2).sum()
    assert int((out.tokens == MASK_ID).sum()) == 0


@pytest.mark.parametrize("decoding", [dict(name="threshold", block_length=None, threshold=0.3),
                                      dict(name="low_confidence", steps=8, block_length=8)], ids=["threshold", "blocks"])
def test_every_step_commits_inside_the_window_step_0_too(family, decoding):
    """Decoding runs over the sliding window: step 0's full forward predicts every masked position,
    but only the window's may be unmasked (the authors' code takes step 0's logits at the window
    only); for Dream, a known row's prediction of an off-window position is not committed either."""
    window = 2
    recorder = Recorder(build_cache("elastic", gamma=0.9, window=window))
    out = generate(net_of(family), random_prompts((7, 3)), build_decoder(**decoding), recorder, GEN)
    assert recorder.steps[0]["active"][:, -GEN:].all()  # step 0 computes everything
    outside = 0
    for step in recorder.steps:
        in_window = leftmost(step["masked"], window)
        assert step["transferred"].any() and not (step["transferred"] & ~in_window).any()
        outside += int((~step["confidence"].isnan() & step["masked"] & ~in_window).sum())
    assert outside == 0  # no fresh prediction outside the window reaches the decoder
    assert int((out.tokens == MASK_ID).sum()) == 0


def test_drift_refreshes_more_rows():
    net, prompts = net_of("llada"), random_prompts((7, 3))
    decoder = lambda: build_decoder("threshold", block_length=None, threshold=0.5)  # noqa: E731
    never = generate(net, prompts, decoder(), build_cache("elastic", gamma=0.0, window=4), GEN)
    always = generate(net, prompts, decoder(), build_cache("elastic", gamma=1.0, window=4), GEN)
    assert never.recompute_ratio < always.recompute_ratio


DECODERS = [("low_confidence", dict(steps=GEN, block_length=8)), ("low_confidence", dict(steps=6, block_length=8)),
            ("random", dict(steps=GEN, block_length=8)), ("threshold", dict(block_length=8)),
            ("threshold", dict(block_length=None, threshold=1.0)), ("certainty_prior", dict(steps=8, sigma=3.0)),
            ("dream", dict(steps=8, alg="entropy")), ("klass", dict(steps=GEN, block_length=8)),
            ("wino", dict(block_length=8, threshold=0.3))]


@pytest.mark.parametrize("settings", [dict(gamma=0.5, window=1), dict(gamma=0.9, window=3)], ids=["w1", "w3"])
@pytest.mark.parametrize("decoding", DECODERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DECODERS)])
def test_no_mask_left(family, decoding, settings):
    name, kwargs = decoding
    if name == "wino" and family == "dream":
        pytest.skip("decoding=wino refuses Dream's shifted logits")
    out = generate(net_of(family), random_prompts((7, 3, 10)), build_decoder(name, **kwargs),
                   build_cache("elastic", **settings), GEN, generator=torch.Generator().manual_seed(0))
    assert int((out.tokens == MASK_ID).sum()) == 0


@pytest.mark.parametrize("bad", [dict(gamma=1.5), dict(gamma=-0.1), dict(gamma=True), dict(window=0), dict(window=2.5)])
def test_bad_hyperparameters(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"cache.{key}="):
        build_cache("elastic", **bad)
