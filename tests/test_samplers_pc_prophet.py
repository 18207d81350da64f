"""PC-Sampler and Prophet: their rules on hand-made logits, and generation with the cache methods.

A small driver (:func:`drive`) plays the denoising loop's side of the decoder protocol without a
model: each step it asks for the plan, hands ``propose`` the logits of the window's masked
positions (in increasing position order, padded like the loop's ``pack``), scatters confidences,
ranks with ``priority`` and commits what ``select`` picks. The rest runs the real loop on tiny
random models (conftest) and on the committed trained tiny checkpoints (assets/).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import generate

from conftest import compose, trained_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

V, MASK = 4, 3  # hand-made vocabulary: tokens 0, 1, 2 and [MASK]
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def context(batch: int, prompt_length: int, gen_length: int, mask_id: int = MASK) -> DecodeContext:
    T = prompt_length + gen_length
    return DecodeContext(batch, prompt_length, gen_length, mask_id, torch.ones(batch, T, dtype=torch.bool), None,
                         torch.device("cpu"))


def all_masked(batch: int, P: int, G: int) -> torch.Tensor:
    masked = torch.zeros(batch, P + G, dtype=torch.bool)
    masked[:, P:] = True
    return masked


def drive(decoder, ctx, masked, logits_at, fresh_at=None, max_steps=100):
    """Run ``decoder`` as the loop does; ``logits_at(step, row, position) -> (V,)`` logits;
    ``fresh_at(step) -> (B, T) bool`` the positions a cache method would recompute (the plan's
    scheduled ones are always recomputed). Returns the per-step committed positions of each row
    and the plans."""
    decoder.check(ctx.gen_length)
    decoder.start(ctx)
    masked = masked.clone()
    B, T = masked.shape
    committed, plans = [], []
    for step in itertools.count():
        assert step < max_steps
        plan = decoder.plan(step, masked)
        if plan is None:
            break
        plans.append(plan)
        lo, hi = plan.window
        wanted = masked.clone()
        wanted[:, :lo] = False
        wanted[:, hi:] = False
        if fresh_at is not None:
            fresh = fresh_at(step)
            if plan.scheduled is not None:
                fresh = fresh | plan.scheduled
            wanted &= fresh
        K = int(wanted.sum(1).max())
        logits = torch.randn(B, K, V, generator=torch.Generator().manual_seed(step))  # padding rows: garbage
        target = torch.full((B, K), T)
        for b in range(B):
            for k, j in enumerate(wanted[b].nonzero().flatten().tolist()):
                logits[b, k] = logits_at(step, b, j)
                target[b, k] = j
        tokens, confidence = decoder.propose(logits, target)
        fresh_conf = torch.full((B, T + 1), float("nan"), dtype=torch.float64).scatter(1, target, confidence.double())[:, :T]
        score = decoder.priority(fresh_conf, masked).masked_fill(fresh_conf.isnan(), float("-inf"))
        chosen = decoder.select(score, plan)
        assert (chosen.sum(1) >= plan.n_transfer).all(), f"step {step}: fewer than n_transfer committed"
        assert not (chosen & ~(masked & ~fresh_conf.isnan())).any(), f"step {step}: committed a stale or known position"
        committed.append([chosen[b].nonzero().flatten().tolist() for b in range(B)])
        masked &= ~chosen
    assert not masked.any(), "decoding ended with masked positions"
    return committed, plans


def probs_logits(token: int, p: float) -> torch.Tensor:
    """Logits whose full softmax gives ``token`` probability p, the other two real tokens the rest, [MASK] 0."""
    probs = torch.full((V,), (1 - p) / 2, dtype=torch.float64)
    probs[token], probs[MASK] = p, 0.0
    return probs.log()


def gap_logits(token: int, gap: float) -> torch.Tensor:
    """Logits with ``token`` ahead of the runner-up by ``gap`` (the [MASK] logit far below)."""
    logits = torch.tensor([0.0, 0.0, 0.0, -20.0], dtype=torch.float64)
    logits[token] = gap
    return logits


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# =========================================================================== PC-Sampler

CONF = {2: 0.5, 3: 0.9, 4: 0.6, 5: 0.95}  # fixed confidence of each response position (P = 2, G = 4)


def fixed_confidence(step, row, j):
    return probs_logits(j % 3, CONF[j])


def test_pc_sampler_scores_hand_computed():
    """score(i) = exp(-lambd (i - lo)) x p(i), lo = the block start (here the response start, 2)."""
    ctx = context(1, 2, 4)
    decoder = build_decoder("pc_sampler", steps=4, lambd=0.5)
    decoder.check(4)
    decoder.start(ctx)
    plan = decoder.plan(0, all_masked(1, 2, 4))
    assert plan.window == (2, 6)
    confidence = torch.tensor([[float("nan"), float("nan"), 0.5, 0.9, 0.6, 0.95]], dtype=torch.float64)
    score = decoder.priority(confidence, all_masked(1, 2, 4))
    expected = [0.5, 0.9 * math.exp(-0.5), 0.6 * math.exp(-1.0), 0.95 * math.exp(-1.5)]
    assert score[0, 2:].tolist() == pytest.approx(expected, rel=1e-12)
    assert score[0, :2].isnan().all()  # stale stays stale (the loop turns it into -inf)
    assert decoder.confidence_is_probability and not decoder.order_known_in_advance


def test_pc_sampler_commit_order_hand_computed():
    """Scores 0.5, 0.5459, 0.2207, 0.2120: order 3, 2, 4, 5; low_confidence: 5, 3, 4, 2."""
    ctx = context(1, 2, 4)
    order, _ = drive(build_decoder("pc_sampler", steps=4, lambd=0.5), ctx, all_masked(1, 2, 4), fixed_confidence)
    assert [o[0] for o in order] == [[3], [2], [4], [5]]
    base, _ = drive(build_decoder("low_confidence", steps=4), ctx, all_masked(1, 2, 4), fixed_confidence)
    assert [o[0] for o in base] == [[5], [3], [4], [2]]
    no_bias, _ = drive(build_decoder("pc_sampler", steps=4, lambd=0.0), ctx, all_masked(1, 2, 4), fixed_confidence)
    assert no_bias == base  # lambd = 0 without frequencies is low_confidence
    strong, _ = drive(build_decoder("pc_sampler", steps=4, lambd=5.0), ctx, all_masked(1, 2, 4), fixed_confidence)
    assert [o[0] for o in strong] == [[2], [3], [4], [5]]  # left to right


def test_pc_sampler_weight_restarts_at_each_block():
    """Blocks of 2: the second block's first position has weight 1 (the authors weight the slice)."""
    ctx = context(1, 2, 4)
    decoder = build_decoder("pc_sampler", steps=2, block_length=2, lambd=0.5)
    decoder.check(4)
    decoder.start(ctx)
    masked = all_masked(1, 2, 4)
    decoder.plan(0, masked)
    masked[:, 2:4] = False
    plan = decoder.plan(1, masked)
    assert plan.window == (4, 6)
    confidence = torch.tensor([[float("nan")] * 4 + [0.6, 0.95]], dtype=torch.float64)
    assert decoder.priority(confidence, masked)[0, 4:].tolist() == pytest.approx([0.6, 0.95 * math.exp(-0.5)])
    order, _ = drive(build_decoder("pc_sampler", steps=4, block_length=2, lambd=0.5), ctx, all_masked(1, 2, 4),
                     fixed_confidence)
    # block [2, 4): 0.5 vs 0.9 e^-0.5 = 0.546 -> 3 first; block [4, 6): 0.6 vs 0.95 e^-0.5 = 0.576 -> 4 first
    assert [o[0] for o in order] == [[3], [2], [4], [5]]


# Position -> (token, probability): token 0 is frequent (500 / 1000), token 1 rare (1 / 1000), token 2
# absent from the corpus (counted once: 1 / 1000).
DEBIAS = {2: (0, 0.9), 3: (1, 0.6), 4: (2, 0.5)}
CORPUS = {"num_token": 1000, "p_baseline_dict": {"0": 500, "1": 1}}


def debias_logits(step, row, j):
    return probs_logits(*DEBIAS[j])


def calibrated(p: float, f: float, alpha: float) -> float:
    return min(alpha, -p * math.log(f + 1e-9))


def test_pc_sampler_calibrated_confidence_hand_computed(tmp_path):
    path = write_json(tmp_path / "corpus.json", CORPUS)
    decoder = build_decoder("pc_sampler", steps=3, lambd=0.0, frequencies=path)
    decoder.start(context(1, 2, 3))
    logits = torch.stack([debias_logits(0, 0, j) for j in (2, 3, 4)])[None]
    tokens, confidence = decoder.propose(logits)
    assert tokens.tolist() == [[0, 1, 2]]
    expected = [calibrated(0.9, 0.5, 10), calibrated(0.6, 1e-3, 10), calibrated(0.5, 1e-3, 10)]
    assert confidence[0].tolist() == pytest.approx(expected, rel=1e-9)  # 0.624, 4.145, 3.454
    assert not decoder.confidence_is_probability
    clipped = build_decoder("pc_sampler", steps=3, frequencies=path, alpha=4.0)
    clipped.start(context(1, 2, 3))
    assert clipped.propose(logits)[1][0].tolist() == pytest.approx([expected[0], 4.0, expected[2]], rel=1e-9)


def test_pc_sampler_debiasing_changes_the_order(tmp_path):
    path = write_json(tmp_path / "corpus.json", CORPUS)
    ctx = context(1, 2, 3)
    plain, _ = drive(build_decoder("pc_sampler", steps=3, lambd=0.0), ctx, all_masked(1, 2, 3), debias_logits)
    assert [o[0] for o in plain] == [[2], [3], [4]]  # by probability: 0.9, 0.6, 0.5
    debiased, _ = drive(build_decoder("pc_sampler", steps=3, lambd=0.0, frequencies=path), ctx, all_masked(1, 2, 3),
                        debias_logits)
    assert [o[0] for o in debiased] == [[3], [4], [2]]  # 4.145, 3.454, 0.624: the frequent token last
    # with lambd = 1: 0.624, 4.145 e^-1 = 1.525, 3.454 e^-2 = 0.467 -> 3, 2, 4
    both, _ = drive(build_decoder("pc_sampler", steps=3, lambd=1.0, frequencies=path), ctx, all_masked(1, 2, 3),
                    debias_logits)
    assert [o[0] for o in both] == [[3], [2], [4]]


@pytest.mark.parametrize("tie_break", ["row", "block"])
def test_pc_sampler_ties_at_alpha_are_broken_as_topk_over_the_row_or_the_block(tmp_path, tie_break):
    """With frequencies and lambd 0 every rare token's calibrated score clips at alpha: all 12
    positions tie. ``row`` takes one torch.topk over the row's float64 scores, ``block`` the authors'
    torch.topk over the block's float32 scores; each step commits what that call returns."""
    P, G = 2, 12
    path = write_json(tmp_path / "corpus.json", CORPUS)
    decoder = build_decoder("pc_sampler", steps=G, lambd=0.0, alpha=1.0, frequencies=path, tie_break=tie_break)
    committed, _ = drive(decoder, context(1, P, G), all_masked(1, P, G), lambda step, row, j: probs_logits(1, 0.8))
    masked = all_masked(1, P, G)[0]
    for step_commits in committed:
        if tie_break == "row":
            expected = torch.full((P + G,), float("-inf"), dtype=torch.float64).masked_fill(masked, 1.0).topk(1).indices
        else:
            expected = P + torch.full((G,), float("-inf")).masked_fill(masked[P:], 1.0).topk(1).indices
        assert step_commits == [expected.tolist()]
        masked[expected] = False
    with pytest.raises(ValueError, match=r"decoding.tie_break='first' \(allowed: \['row', 'block'\]\)"):
        build_decoder("pc_sampler", steps=G, tie_break="first")


@pytest.mark.parametrize("corpus", [
    {"num_token": 1000, "token_frequency_dict": {"0": 500, "1": 1}},  # the authors' counting script's output
    {"0": 500, "1": 1, "2": 1, "5": 498},  # a plain id -> count object: N = the sum = 1000
])
def test_pc_sampler_frequency_formats(tmp_path, corpus):
    path = write_json(tmp_path / "corpus.json", corpus)
    decoder = build_decoder("pc_sampler", steps=3, frequencies=path)
    table = decoder.frequency_table(8, torch.device("cpu"))
    assert table[:3].tolist() == pytest.approx([0.5, 1e-3, 1e-3])


def test_pc_sampler_bad_hyperparameters(tmp_path):
    for key, value, pattern in [
        ("lambd", -0.5, r"decoding\.lambd=-0\.5 must be a finite number >= 0"),
        ("lambd", float("inf"), r"decoding\.lambd=inf"),
        ("lambd", "high", r"decoding\.lambd='high'"),
        ("alpha", 0, r"decoding\.alpha=0 must be a number > 0"),
        ("alpha", -1.0, r"decoding\.alpha=-1\.0"),
        ("frequencies", 3, r"decoding\.frequencies=3 must be a path"),
        ("frequencies", str(tmp_path / "missing.json"), r"decoding\.frequencies=.*missing\.json.*no such file"),
        ("temperature", -1, r"decoding\.temperature=-1"),
        ("block_length", 0, r"decoding\.block_length=0"),
        ("steps", 0, r"decoding\.steps=0"),
    ]:
        params = dict(steps=4)
        params[key] = value
        with pytest.raises(ValueError, match=pattern):
            build_decoder("pc_sampler", **params)
    for name, content, pattern in [
        ("bad.json", "{not json", "not a JSON file"),
        ("list.json", "[1, 2]", "expected a JSON object"),
        ("key.json", json.dumps({"the": 3}), "key 'the' is not a token id"),
        ("neg.json", json.dumps({"3": -1}), r"count of token 3 \(-1\) must be a number >= 0"),
        ("zero.json", json.dumps({"3": 0}), "sum to 0"),
        ("total.json", json.dumps({"num_token": 0, "p_baseline_dict": {}}), r"num_token=0 must be a number > 0"),
        ("table.json", json.dumps({"num_token": 5}), "no p_baseline_dict"),
    ]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=rf"decoding\.frequencies=.*{name}.*{pattern}"):
            build_decoder("pc_sampler", steps=4, frequencies=str(tmp_path / name))
    decoder = build_decoder("pc_sampler", steps=3, block_length=2)
    with pytest.raises(ValueError, match=r"steps=3 is not divisible by the number of blocks \(4\)"):
        decoder.check(8)
    with pytest.raises(ValueError, match=r"gen_length=5 is not divisible by block_length=2"):
        decoder.check(5)


def test_pc_sampler_corpus_ids_must_fit_the_vocabulary(tmp_path, make_args, make_net, make_prompts):
    path = write_json(tmp_path / "big.json", {"0": 3, "64": 1})
    net = make_net(make_args("llada"), seed=100, logit_scale=3.0)
    with pytest.raises(ValueError, match=r"decoding\.frequencies=.*token id 64 is outside the model's vocabulary of 64"):
        generate(net, make_prompts([4]), build_decoder("pc_sampler", steps=4, frequencies=path), build_cache("none"), 4)


# =========================================================================== Prophet


def test_prophet_phase_thresholds():
    """progress = (step + 1) / steps: early < 0.33 <= mid < 0.67 <= late."""
    decoder = build_decoder("prophet", steps=10, early_threshold=9.0, mid_threshold=6.0, late_threshold=3.0)
    assert [decoder.threshold(s) for s in range(10)] == [9.0] * 3 + [6.0] * 3 + [3.0] * 4
    three = build_decoder("prophet", steps=3)
    assert [three.threshold(s) for s in range(3)] == [5.0, 5.0, 2.5]  # 1/3 is already past 0.33, 2/3 not 0.67
    assert three.confidence_is_probability and not three.order_known_in_advance


def staged_gaps(trigger_step: int, trigger_gap: float, low: float = 1.0):
    """Gap ``low`` before ``trigger_step`` and ``trigger_gap`` from it on, + 0.01 per response offset
    (so the rightmost masked position is the most confident)."""
    def logits_at(step, row, j):
        base = trigger_gap if step >= trigger_step else low
        return gap_logits(j % 3, base + 0.01 * (j - 2))
    return logits_at


BASE_ORDER = [[5], [4], [3], [2], [9], [8], [7], [6]]  # low_confidence under staged gaps: rightmost first per block


def test_prophet_without_trigger_is_its_base_rule():
    ctx = context(1, 2, 8)
    for window in ("rest", "block"):
        order, plans = drive(build_decoder("prophet", steps=8, block_length=4, window=window), ctx, all_masked(1, 2, 8),
                             staged_gaps(99, 0.0))
        assert [o[0] for o in order] == BASE_ORDER
        assert [p.window for p in plans] == [(2, 10)] * 4 + [(6, 10)] * 4 if window == "rest" else \
            [(2, 6)] * 4 + [(6, 10)] * 4
        assert all(p.scheduled is None for p in plans)
    base, _ = drive(build_decoder("low_confidence", steps=8, block_length=4), ctx, all_masked(1, 2, 8), staged_gaps(99, 0.0))
    assert [o[0] for o in base] == BASE_ORDER


def test_prophet_commits_everything_when_the_gap_holds():
    """Steps 0-2: gap ~1 < 7.5. Step 3 (progress 0.5, mid threshold 5.0): the masked positions are 2
    and 6..9, mean gap 5.5 + 0.01 x mean(0, 4, 5, 6, 7) = 5.544 >= 5: all five committed at once."""
    ctx = context(1, 2, 8)
    order, plans = drive(build_decoder("prophet", steps=8, block_length=4), ctx, all_masked(1, 2, 8), staged_gaps(3, 5.5))
    assert [o[0] for o in order] == [[5], [4], [3], [2, 6, 7, 8, 9]]
    assert len(plans) == 4
    # just below the threshold (4.9 + 0.044 < 5): the base rule goes on; at step 4 (progress 0.625,
    # still mid) the block-1 gap 4.9 + 0.01 x 5.5 < 5 either; step 5 (0.75, late 2.5) fires.
    order, _ = drive(build_decoder("prophet", steps=8, block_length=4), ctx, all_masked(1, 2, 8), staged_gaps(3, 4.9))
    assert [o[0] for o in order] == [[5], [4], [3], [2], [9], [6, 7, 8]]


def test_prophet_window_block_commits_later_blocks_one_step_later():
    """window=block: the gap is over the block (position 2: 5.5 >= 5) and the later block, without a
    prediction in that forward, is scheduled and committed by the next one."""
    ctx = context(1, 2, 8)
    order, plans = drive(build_decoder("prophet", steps=8, block_length=4, window="block"), ctx, all_masked(1, 2, 8),
                         staged_gaps(3, 5.5))
    assert [o[0] for o in order] == [[5], [4], [3], [2], [6, 7, 8, 9]]
    assert plans[4].scheduled[0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert plans[4].n_transfer.tolist() == [4] and plans[4].window == (6, 10)


def test_prophet_stale_positions_are_scheduled_next_step():
    """A cache method that leaves positions 8, 9 stale at step 3: the gap is over the fresh ones
    (2, 6, 7: 5.5 + 0.03 >= 5), they are committed, and 8, 9 follow in a scheduled step."""
    ctx = context(1, 2, 8)

    def fresh_at(step):
        fresh = torch.ones(1, 10, dtype=torch.bool)
        if step == 3:
            fresh[:, 8:] = False
        return fresh

    order, plans = drive(build_decoder("prophet", steps=8, block_length=4), ctx, all_masked(1, 2, 8),
                         staged_gaps(3, 5.5), fresh_at)
    assert [o[0] for o in order] == [[5], [4], [3], [2, 6, 7], [8, 9]]
    assert plans[4].scheduled[0].nonzero().flatten().tolist() == [8, 9] and plans[4].n_transfer.tolist() == [2]


def test_prophet_rows_decide_alone():
    """Row 0 fires at step 3; row 1 (low gaps) keeps the base schedule; row 0 then asks for nothing."""
    ctx = context(2, 2, 8)
    fire, calm = staged_gaps(3, 5.5), staged_gaps(99, 0.0)
    order, plans = drive(build_decoder("prophet", steps=8, block_length=4), ctx, all_masked(2, 2, 8),
                         lambda s, b, j: fire(s, b, j) if b == 0 else calm(s, b, j))
    assert [o[0] for o in order] == [[5], [4], [3], [2, 6, 7, 8, 9], [], [], [], []]
    assert [o[1] for o in order] == BASE_ORDER
    assert [p.n_transfer.tolist() for p in plans[4:]] == [[0, 1]] * 4


def test_prophet_answer_slot():
    """answer_start=6, answer_length=2 watches positions 8, 9 only: gap 8 there, 1 elsewhere. At
    step 0 (early, 7.5) the slot's mean 8 fires; over every masked position (mean 2.75) it does not."""
    ctx = context(1, 2, 8)

    def slot_logits(step, row, j):
        return gap_logits(j % 3, 8.0 if j >= 8 else 1.0)

    order, _ = drive(build_decoder("prophet", steps=8, block_length=4, answer_start=6, answer_length=2), ctx,
                     all_masked(1, 2, 8), slot_logits)
    assert order == [[[2, 3, 4, 5, 6, 7, 8, 9]]]
    order, _ = drive(build_decoder("prophet", steps=8, block_length=4), ctx, all_masked(1, 2, 8), slot_logits)
    assert len(order) > 1
    # the slot already written (here: known from the start): the answer is there, the rest goes all in
    masked = all_masked(1, 2, 8)
    masked[:, 8:] = False
    order, _ = drive(build_decoder("prophet", steps=8, block_length=4, answer_start=6, answer_length=2), ctx, masked,
                     staged_gaps(99, 0.0))
    assert order == [[[2, 3, 4, 5, 6, 7]]]


def test_prophet_gap_is_over_logits_not_probabilities():
    """Two candidates 3 logits apart (probabilities ~0.95 / 0.05) against a threshold of 2.9 / 3.1."""
    ctx = context(1, 2, 4)

    def logits_at(step, row, j):
        return torch.tensor([3.0, 0.0, -30.0, -30.0], dtype=torch.float64)

    fired, _ = drive(build_decoder("prophet", steps=4, early_threshold=2.9), ctx, all_masked(1, 2, 4), logits_at)
    assert len(fired) == 1
    held, _ = drive(build_decoder("prophet", steps=4, early_threshold=3.1, mid_threshold=3.1, late_threshold=3.1), ctx,
                    all_masked(1, 2, 4), logits_at)
    assert len(held) == 4


def test_prophet_bad_hyperparameters():
    for key, value, pattern in [
        ("early_threshold", -1.0, r"decoding\.early_threshold=-1\.0 must be a number >= 0"),
        ("mid_threshold", float("nan"), r"decoding\.mid_threshold=nan"),
        ("late_threshold", "low", r"decoding\.late_threshold='low'"),
        ("late_threshold", True, r"decoding\.late_threshold=True"),
        ("answer_start", -1, r"decoding\.answer_start=-1 must be an integer >= 0"),
        ("answer_start", 1.5, r"decoding\.answer_start=1\.5"),
        ("answer_length", 0, r"decoding\.answer_length=0 must be an integer >= 1"),
        ("window", "all", r"decoding\.window='all' \(allowed: \['rest', 'block'\]\)"),
        ("temperature", -0.1, r"decoding\.temperature=-0\.1"),
        ("block_length", 0, r"decoding\.block_length=0"),
        ("steps", 0, r"decoding\.steps=0"),
    ]:
        params = dict(steps=4)
        params[key] = value
        with pytest.raises(ValueError, match=pattern):
            build_decoder("prophet", **params)
    with pytest.raises(ValueError, match=r"decoding\.answer_start=8 must be < gen_length=8"):
        build_decoder("prophet", steps=8, answer_start=8).check(8)
    with pytest.raises(ValueError, match=r"steps=3 is not divisible by the number of blocks \(2\)"):
        build_decoder("prophet", steps=3, block_length=4).check(8)
    with pytest.raises(ValueError, match=r"gen_length=8 is not divisible by block_length=3"):
        build_decoder("prophet", steps=8, block_length=3).check(8)
    assert build_decoder("prophet", steps=4, early_threshold=float("inf")).thresholds[0] == float("inf")


# =========================================================================== generation with caches

GEN, BLOCK, STEPS = 12, 4, 6
NEVER = dict(early_threshold=float("inf"), mid_threshold=float("inf"), late_threshold=float("inf"))
CACHES = {
    "none": {},
    "dkv_decode": dict(refresh_interval=2),
    "prefix": {},
    "dual": {},
    "dllm_cache": dict(prompt_interval=5, response_interval=3, update_ratio=0.25),
}


@pytest.fixture(scope="module")
def nets():
    from conftest import tiny_args, tiny_net

    return {family: tiny_net(tiny_args(family), seed=100, logit_scale=3.0) for family in ("llada", "dream")}


def run(net, decoder, cache="none", prompts=None, gen=GEN, **cache_params):
    from conftest import random_prompts

    params = {**CACHES.get(cache, {}), **cache_params}
    prompts = prompts or random_prompts([7, 3, 5], seed=21)
    out = generate(net, prompts, decoder, build_cache(cache, **params), gen, generator=torch.Generator().manual_seed(0))
    assert not (out.tokens == net.args.mask_token_id).any()
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_pc_sampler_with_zero_lambda_is_low_confidence(nets, family, cache):
    net = nets[family]
    pc = run(net, build_decoder("pc_sampler", steps=STEPS, block_length=BLOCK, lambd=0.0), cache)
    base = run(net, build_decoder("low_confidence", steps=STEPS, block_length=BLOCK), cache)
    assert torch.equal(pc.tokens, base.tokens) and pc.nfe == base.nfe == STEPS
    assert pc.active_token_layers == base.active_token_layers


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", [*CACHES, "d2cache"])
def test_pc_sampler_composes_with_caches(nets, family, cache, tmp_path):
    net = nets[family]
    block = None if cache == "d2cache" else BLOCK
    extra = dict(k=2, p=0.3, sigma=3.0) if cache == "d2cache" else {}
    out = run(net, build_decoder("pc_sampler", steps=STEPS, block_length=block, lambd=0.5), cache, **extra)
    assert out.nfe == STEPS
    if cache != "d2cache":  # d2cache ranks by probability: it refuses the calibrated score
        path = write_json(tmp_path / "corpus.json", {"num_token": 100, "p_baseline_dict": {str(t): t for t in range(40)}})
        assert run(net, build_decoder("pc_sampler", steps=STEPS, block_length=block, frequencies=path), cache).nfe == STEPS
    else:
        path = write_json(tmp_path / "corpus.json", {"0": 1})
        with pytest.raises(ValueError, match="cache=d2cache.*decoding='pc_sampler'"):
            build_cache("d2cache").check(build_decoder("pc_sampler", steps=STEPS, frequencies=path))


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("window", ["rest", "block"])
def test_prophet_that_never_fires_is_low_confidence(nets, family, cache, window):
    """Same tokens and forwards; same recomputation where the window does not steer the cache
    (with window=rest, dual recomputes the rest of the response: it follows the decoder's window)."""
    net = nets[family]
    prophet = run(net, build_decoder("prophet", steps=STEPS, block_length=BLOCK, window=window, **NEVER), cache)
    base = run(net, build_decoder("low_confidence", steps=STEPS, block_length=BLOCK), cache)
    assert prophet.nfe == base.nfe == STEPS
    if not (cache == "dual" and window == "rest"):
        assert torch.equal(prophet.tokens, base.tokens)
        assert prophet.active_token_layers == base.active_token_layers
    else:  # fresher suffix K/V: the tokens may differ
        assert prophet.active_token_layers > base.active_token_layers


class Spy:
    """Wraps a decoder's select() to record what each step commits."""

    def __init__(self, decoder):
        self.steps = []
        select = decoder.select

        def recording(score, plan):
            chosen = select(score, plan)
            self.steps.append(chosen.clone())
            return chosen

        decoder.select = recording


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prophet_fires_at_a_known_step_on_a_model(nets, family):
    """Thresholds inf / inf / 0: the first late step (progress 5/6 at step 4) commits every masked
    position; steps 0-3 and the tokens committed up to step 4 are those of low_confidence."""
    net = nets[family]
    prophet = build_decoder("prophet", steps=STEPS, block_length=BLOCK, early_threshold=float("inf"),
                            mid_threshold=float("inf"), late_threshold=0.0)
    base = build_decoder("low_confidence", steps=STEPS, block_length=BLOCK)
    spy_p, spy_b = Spy(prophet), Spy(base)
    out_p, out_b = run(net, prophet), run(net, base)
    assert out_p.nfe == 5 and out_b.nfe == STEPS
    for step in range(4):
        assert torch.equal(spy_p.steps[step], spy_b.steps[step])
    done_before = torch.stack(spy_p.steps[:4]).any(0)
    assert torch.equal(spy_p.steps[4], ~done_before[:, :] & (torch.arange(done_before.shape[1]) >= done_before.shape[1] - GEN))
    same = torch.stack(spy_b.steps[:5]).any(0)[:, -GEN:]
    assert torch.equal(out_p.tokens[same], out_b.tokens[same])


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", [*CACHES, "d2cache"])
@pytest.mark.parametrize("window", ["rest", "block"])
def test_prophet_composes_with_caches(nets, family, cache, window):
    """Firing at step 0 (threshold 0), at a mid step and never: no [MASK] left, forwards as expected."""
    net = nets[family]
    block = None if cache == "d2cache" else BLOCK
    extra = dict(k=2, p=0.3, sigma=3.0) if cache == "d2cache" else {}
    blocks = GEN // (block or GEN)
    at_once = run(net, build_decoder("prophet", steps=STEPS, block_length=block, window=window, early_threshold=0.0),
                  cache, **extra)
    # step 0 is a full forward under every cache: rest commits everything from it; block commits
    # the first block and the later ones in one more forward
    assert at_once.nfe == (2 if window == "block" and blocks > 1 else 1)
    mid = run(net, build_decoder("prophet", steps=STEPS, block_length=block, window=window, early_threshold=float("inf"),
                                 mid_threshold=0.0), cache, **extra)
    assert 2 <= mid.nfe <= 4
    never = run(net, build_decoder("prophet", steps=STEPS, block_length=block, window=window, **NEVER), cache, **extra)
    assert never.nfe == STEPS


@pytest.fixture(scope="module", params=["llada", "dream"])
def trained(request):
    from dllm.eval.arith_data import load_test, prompt_text
    from dllm.models.loading import load_model
    from dllm.models.tokenization import encode_prompts, load_tokenizer

    folder = ASSETS / f"tiny_{request.param}"
    tokenizer = load_tokenizer(folder)
    prompts = encode_prompts(tokenizer, [prompt_text(d["question"]) for d in load_test()[:2]], chat=True)
    prompts[1] = prompts[1][5:]
    return load_model(folder), prompts


@pytest.mark.parametrize("cache", ["none", "dkv_decode", "prefix", "dual", "dllm_cache"])
def test_both_on_the_trained_tiny_models(trained, cache, tmp_path):
    """Defaults of the YAMLs at gen 32 (block 32 for Prophet, one block for PC-Sampler), every cache."""
    net, prompts = trained
    path = write_json(tmp_path / "corpus.json", {"num_token": 1000, "p_baseline_dict": {str(t): 7 for t in range(50)}})
    for decoder in (build_decoder("prophet", steps=32, block_length=32), build_decoder("prophet", steps=32, window="block"),
                    build_decoder("pc_sampler", steps=32), build_decoder("pc_sampler", steps=16, frequencies=path)):
        out = run(net, decoder, cache, prompts=prompts, gen=32)
        assert out.nfe <= decoder.steps + (decoder.name == "prophet")


@pytest.mark.parametrize("name", ["pc_sampler", "prophet"])
def test_yaml_builds_through_the_pipeline(name):
    from dllm.pipeline import plan_run

    cfg = compose(f"decoding={name}", "gen_length=64")
    plan = plan_run(cfg)
    assert plan.decoder.name == name and plan.decoder.steps == 64
    if name == "pc_sampler":
        assert (plan.decoder.lambd, plan.decoder.alpha, plan.decoder.frequencies, plan.decoder.block_length) == (0.25, 10.0, None, None)
    else:
        assert plan.decoder.thresholds == (7.5, 5.0, 2.5) and plan.decoder.block_length == 32
        assert (plan.decoder.answer_start, plan.decoder.answer_length, plan.decoder.window) == (None, 5, "rest")


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prophet_block_window_rows_of_a_batch_decode_as_alone(family):
    """window=block: a step that commits one row's leftovers widens the batch's window to the end of
    the response; the other rows' gaps and commits still count only their own block."""
    net, prompts = trained_tiny(family)
    params = dict(steps=64, block_length=32, window="block")
    batch = generate(net, prompts, build_decoder("prophet", **params), build_cache("none"), 64)
    alone = [generate(net, [p], build_decoder("prophet", **params), build_cache("none"), 64) for p in prompts]
    assert [b.tolist() for b in batch.tokens] == [a.tokens[0].tolist() for a in alone]
    assert len({a.nfe for a in alone}) > 1  # the rows go all in at different steps
