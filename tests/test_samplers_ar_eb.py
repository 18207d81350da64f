"""decoding=ar (left to right, one token per step) and decoding=eb_sampler (entropy-bounded
unmasking, Ben-Hamu et al. 2025): each rule pinned on hand-made logits and on tiny models, their
composition with the cache methods, and the refusal of bad hyperparameters."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import MASK_ID, compose, random_prompts, tiny_args, tiny_net
from dllm.cache.base import build_cache
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import generate
from dllm.pipeline import plan_run

pytestmark = pytest.mark.usefixtures("one_thread")
GEN, BLOCK = 16, 8
LENGTHS = (6, 9, 3)  # a left-padded batch


def net_of(family: str, scale: float = 8.0):
    return tiny_net(tiny_args(family), logit_scale=scale, silent_ids=(MASK_ID,))


def recording(decoder):
    """Wraps ``decoder.select``: returns the list of (plan, score, chosen, entropies) of every step
    (entropies: eb_sampler's per-position entropies of the step, None for other decoders)."""
    steps, inner = [], decoder.select

    def select(score, plan):
        chosen = inner(score, plan)
        entropy = getattr(decoder, "entropy_map", None)
        steps.append((plan, score.clone(), chosen.clone(), None if entropy is None else entropy.clone()))
        return chosen

    decoder.select = select
    return steps


# ---------------------------------------------------------------------------------------------- ar


@pytest.mark.parametrize("block_length", [None, 4, 1])
def test_ar_commits_position_p_plus_i_at_step_i(family, block_length):
    decoder = build_decoder("ar", steps=GEN, block_length=block_length)
    steps = recording(decoder)
    out = generate(net_of(family), random_prompts(LENGTHS), decoder, build_cache("none"), GEN)
    P, B = max(LENGTHS), len(LENGTHS)
    assert out.nfe == GEN == len(steps)
    for i, (plan, _, chosen, _) in enumerate(steps):
        expected = torch.zeros(B, P + GEN, dtype=torch.bool)
        expected[:, P + i] = True
        assert torch.equal(chosen, expected) and torch.equal(plan.scheduled, expected), f"step {i}"
        block = block_length or GEN
        assert plan.window == (P + i // block * block, P + (i // block + 1) * block)
        assert (plan.block, plan.block_step) == divmod(i, block)
    assert not (out.tokens == MASK_ID).any()


def plain_left_to_right(net, prompts: list[list[int]]) -> torch.Tensor:
    """The textbook loop: a full forward per token, the argmax (never [MASK]) of the next position."""
    P, shift = max(map(len, prompts)), net.args.logit_shift
    x = torch.full((len(prompts), P + GEN), MASK_ID, dtype=torch.long)
    real = torch.ones_like(x, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        x[row, P - len(prompt) : P] = torch.tensor(prompt)
        x[row, : P - len(prompt)] = net.args.pad_token_id
        real[row, : P - len(prompt)] = False
    for i in range(GEN):
        logits = net(x, attention_mask=real)[:, P + i - shift].clone()
        logits[:, MASK_ID] = float("-inf")
        x[:, P + i] = logits.argmax(-1)
    return x[:, P:]


def test_ar_equals_a_plain_left_to_right_greedy_loop(family):
    net, prompts = net_of(family, scale=3.0), random_prompts(LENGTHS, seed=1)
    expected = plain_left_to_right(net, prompts)
    for block_length in (None, 4):
        out = generate(net, prompts, build_decoder("ar", block_length=block_length), build_cache("none"), GEN)
        assert torch.equal(out.tokens, expected), block_length


def test_ar_steps_must_equal_gen_length():
    build_decoder("ar", steps=None).check(GEN)  # null: gen_length
    build_decoder("ar", steps=GEN).check(GEN)
    with pytest.raises(ValueError, match=r"decoding.steps=8 must equal gen_length=16"):
        build_decoder("ar", steps=8).check(GEN)
    with pytest.raises(ValueError, match=r"gen_length=16 is not divisible by block_length=5"):
        build_decoder("ar", block_length=5).check(GEN)


# ------------------------------------------------------------------------------- eb: hand-made rule

V, T = 8, 7  # vocabulary (id 7 = [MASK]); positions of the fake generation (prompt 1, response 6)


def dist(*probs: float) -> list[float]:
    """Logits of a distribution over the first ids (exactly zero probability elsewhere, [MASK] included)."""
    return [math.log(p) for p in probs] + [float("-inf")] * (V - len(probs))


def H(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs)


A, Bd, C, D = (1.0,), (0.5, 0.5), (0.6, 0.1, 0.1, 0.1, 0.1), (0.25, 0.25, 0.25, 0.25)
# Row 0: A, B, C, D fresh at positions 1, 2, 4, 6 (3 and 5 stale); row 1: B, C, D at 2, 3, 5, plus the
# loop's padding entry (a one-hot: it must not count).
LOGITS = torch.tensor([[dist(*A), dist(*Bd), dist(*C), dist(*D)],
                       [dist(*Bd), dist(*C), dist(*D), dist(1.0)]], dtype=torch.float32)
TARGETS = torch.tensor([[1, 2, 4, 6], [2, 3, 5, T]])  # T: the loop's dropped column
NAMES = {0: {1: "A", 2: "B", 4: "C", 6: "D"}, 1: {2: "B", 3: "C", 5: "D"}}


def hand_step(gamma: float, error_proxy: str = "entropy", order: torch.Tensor | None = None):
    """One step of eb_sampler as the loop runs it, on the hand-made logits; the committed names per row."""
    decoder = build_decoder("eb_sampler", gamma=gamma, error_proxy=error_proxy)
    decoder.check(T - 1)
    decoder.start(DecodeContext(2, 1, T - 1, V - 1, torch.ones(2, T, dtype=torch.bool), None, torch.device("cpu")))
    masked = torch.ones(2, T, dtype=torch.bool)
    masked[:, 0] = False
    plan = decoder.plan(0, masked)
    order = torch.arange(4).expand(2, -1) if order is None else order  # the loop's row order, or another
    targets = TARGETS.gather(1, order)
    tokens, confidence = decoder.propose(LOGITS.gather(1, order[..., None].expand(-1, -1, V)).clone(), targets)
    fresh_conf = torch.full((2, T + 1), float("nan"), dtype=torch.float64).scatter(1, targets, confidence.double())[:, :T]
    score = decoder.priority(fresh_conf, masked).masked_fill(fresh_conf.isnan(), float("-inf"))
    chosen = decoder.select(score, plan)
    return decoder, [{NAMES[row][p] for p in chosen[row].nonzero().flatten().tolist()} for row in range(2)]


def test_eb_entropies_are_the_full_softmax_entropies_on_their_positions():
    decoder, _ = hand_step(0.1)
    nan = float("nan")
    expected = [[nan, H(*A), H(*Bd), nan, H(*C), nan, H(*D)], [nan, nan, H(*Bd), H(*C), nan, H(*D), nan]]
    for got, want in zip(decoder.entropy_map.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12, nan_ok=True)
    assert H(*Bd) == pytest.approx(math.log(2)) and H(*D) == pytest.approx(math.log(4))


@pytest.mark.parametrize("gamma, proxy, row0, row1", [
    # entropy order A (0), B (0.693), C (1.228), D (1.386); sum - max along it: 0, 0, 0.693, 1.921.
    # Row 1 (no A): B, C, D: 0, 0.693, 1.921.
    (0.0, "entropy", {"A", "B"}, {"B"}),  # <=: B's sum - max is 0 (A's entropy is 0); row 1: at least one
    (0.5, "entropy", {"A", "B"}, {"B"}),
    (0.7, "entropy", {"A", "B", "C"}, {"B", "C"}),
    (1.9, "entropy", {"A", "B", "C"}, {"B", "C"}),
    (2.0, "entropy", {"A", "B", "C", "D"}, {"B", "C", "D"}),
    (float("inf"), "entropy", {"A", "B", "C", "D"}, {"B", "C", "D"}),
    # confidence order A (1), C (0.6), B (0.5), D (0.25); sum - max: 0, 0, 0.693, 1.921; row 1: C, B, D.
    (0.0, "confidence", {"A", "C"}, {"C"}),
    (0.5, "confidence", {"A", "C"}, {"C"}),
    (0.7, "confidence", {"A", "C", "B"}, {"C", "B"}),
    # margin order A (1), C (0.5), then B and D (0) by position.
    (0.5, "margin", {"A", "C"}, {"C"}),
    (0.7, "margin", {"A", "C", "B"}, {"C", "B"}),
])
def test_eb_commits_in_proxy_order_while_sum_minus_max_entropy_is_at_most_gamma(gamma, proxy, row0, row1):
    assert hand_step(gamma, proxy)[1] == [row0, row1]


def test_eb_lays_values_on_the_positions_the_loop_names():
    """The entropies follow the positions passed with the logits, in any order; without them, refused."""
    shuffled = torch.tensor([[3, 0, 2, 1], [3, 2, 1, 0]])
    assert hand_step(0.7, order=shuffled)[1] == hand_step(0.7)[1] == [{"A", "B", "C"}, {"B", "C"}]
    decoder = build_decoder("eb_sampler")
    decoder.start(DecodeContext(2, 1, T - 1, V - 1, torch.ones(2, T, dtype=torch.bool), None, torch.device("cpu")))
    with pytest.raises(ValueError, match="needs the positions"):
        decoder.propose(LOGITS.clone())


# ------------------------------------------------------------------------------ eb: on tiny models


def expected_count(score: torch.Tensor, entropy: torch.Tensor, gamma: float) -> list[int]:
    """Per row, the rule in plain Python: best score first (ties: leftmost), add entropies, stop
    before the first position where sum - max > gamma; at least one if anything is eligible."""
    counts = []
    for s_row, h_row in zip(score.tolist(), entropy.tolist()):
        eligible = sorted((-s, p) for p, s in enumerate(s_row) if math.isfinite(s))
        total, top, n = 0.0, 0.0, 0
        for _, p in eligible:
            total, top = total + h_row[p], max(top, h_row[p])
            if total - top > gamma:
                break
            n += 1
        counts.append(max(n, 1) if eligible else 0)
    return counts


@pytest.mark.parametrize("gamma, proxy, block_length", [(0.1, "entropy", None), (1.0, "entropy", BLOCK),
                                                       (0.5, "confidence", None), (2.0, "margin", BLOCK)])
def test_eb_count_per_step_on_a_tiny_model(family, gamma, proxy, block_length):
    """Every step of a real generation (left-padded batch): the count per row is the rule recomputed
    in plain Python from that step's scores and entropies, at least one; the committed positions
    are the best ones by the proxy, inside the block."""
    decoder = build_decoder("eb_sampler", gamma=gamma, error_proxy=proxy, block_length=block_length)
    steps = recording(decoder)
    out = generate(net_of(family, scale=6.0), random_prompts(LENGTHS), decoder, build_cache("none"), GEN)
    several = 0
    for plan, score, chosen, entropy in steps:
        counts = chosen.sum(1).tolist()
        assert counts == expected_count(score, entropy, gamma)
        assert all(c >= 1 for c, n in zip(counts, plan.n_transfer.tolist()) if n)
        lo, hi = plan.window
        assert not chosen[:, :lo].any() and not chosen[:, hi:].any()
        for row in range(len(LENGTHS)):
            picked, rest = score[row][chosen[row]], score[row][~chosen[row] & torch.isfinite(score[row])]
            assert torch.isfinite(picked).all() and (len(rest) == 0 or picked.min() >= rest.max())
        several += max(counts) > 1
    assert several, "some step commits more than one token"
    assert sum(chosen.sum(1) for _, _, chosen, _ in steps).tolist() == [GEN] * len(LENGTHS)
    assert not (out.tokens == MASK_ID).any()


@pytest.mark.parametrize("block_length", [None, BLOCK])
def test_eb_gamma_zero_with_confidence_order_is_low_confidence_one_token_per_step(family, block_length):
    net, prompts = net_of(family, scale=3.0), random_prompts(LENGTHS)
    eb = generate(net, prompts, build_decoder("eb_sampler", gamma=0.0, error_proxy="confidence", block_length=block_length),
                  build_cache("none"), GEN)
    lc = generate(net, prompts, build_decoder("low_confidence", steps=GEN, block_length=block_length or GEN),
                  build_cache("none"), GEN)
    assert eb.nfe == lc.nfe == GEN
    assert torch.equal(eb.tokens, lc.tokens)


def test_eb_gamma_zero_with_entropy_order_is_one_token_per_step(family):
    decoder = build_decoder("eb_sampler", gamma=0.0)
    steps = recording(decoder)
    out = generate(net_of(family, scale=3.0), random_prompts(LENGTHS), decoder, build_cache("none"), GEN)
    assert out.nfe == GEN
    for _, score, chosen, entropy in steps:  # the lowest-entropy fresh position, alone
        assert chosen.sum(1).tolist() == [1] * len(LENGTHS)
        lowest = entropy.masked_fill(~torch.isfinite(score), float("inf")).argmin(1)
        assert torch.equal(chosen.float().argmax(1), lowest)


@pytest.mark.parametrize("block_length", [None, BLOCK])
def test_eb_large_gamma_commits_every_fresh_token_in_one_step(family, block_length):
    net, prompts = net_of(family), random_prompts(LENGTHS)
    for gamma in (1e9, float("inf")):
        out = generate(net, prompts, build_decoder("eb_sampler", gamma=gamma, block_length=block_length),
                       build_cache("none"), GEN)
        assert out.nfe == GEN // (block_length or GEN)
        assert not (out.tokens == MASK_ID).any()
    # one block, one forward: the argmax of that forward everywhere
    if block_length is None:
        one = generate(net, prompts, build_decoder("low_confidence", steps=1, block_length=GEN), build_cache("none"), GEN)
        assert torch.equal(out.tokens, one.tokens)


# ------------------------------------------------------------------------------------- composition

REFRESH_EVERY_STEP = {"dkv_decode": dict(refresh_interval=1), "d2cache": dict(refresh_interval=1),
                      "prefix": dict(refresh_interval=1), "dual": dict(refresh_interval=1),
                      "dllm_cache": dict(prompt_interval=1, response_interval=1), "dkv_greedy": dict(refresh_interval=1)}
DECODERS = {
    "ar": lambda: build_decoder("ar"),
    "ar_blocks": lambda: build_decoder("ar", block_length=4),
    "eb": lambda: build_decoder("eb_sampler", gamma=0.5),
    "eb_blocks": lambda: build_decoder("eb_sampler", gamma=0.5, block_length=BLOCK, error_proxy="confidence"),
}


@pytest.mark.parametrize("method", ["dkv_decode", "prefix", "dual", "d2cache", "dllm_cache", "dkv_greedy"])
@pytest.mark.parametrize("decoding", list(DECODERS))
def test_composes_with_cache_methods(family, method, decoding):
    """No [MASK] left under the method's defaults, and with its refresh forced every step the
    tokens are cache=none's."""
    make = DECODERS[decoding]
    if method == "dkv_greedy" and decoding.startswith("eb"):
        with pytest.raises(ValueError, match="eb_sampler"):
            build_cache(method).check(make())
        return
    net, prompts = net_of(family), random_prompts(LENGTHS)
    base = generate(net, prompts, make(), build_cache("none"), GEN)
    out = generate(net, prompts, make(), build_cache(method), GEN)
    assert not (out.tokens == MASK_ID).any() and out.recompute_ratio < 1
    forced = generate(net, prompts, make(), build_cache(method, **REFRESH_EVERY_STEP[method]), GEN)
    assert torch.equal(forced.tokens, base.tokens)


@pytest.mark.parametrize("method", ["dkv_decode", "prefix", "dual", "d2cache", "dkv_greedy"])
def test_ar_commits_its_scheduled_position_under_every_cache(family, method):
    decoder = build_decoder("ar", block_length=4)
    steps = recording(decoder)
    generate(net_of(family), random_prompts(LENGTHS), decoder, build_cache(method), GEN)
    P = max(LENGTHS)
    assert [chosen.nonzero()[:, 1].tolist() for _, _, chosen, _ in steps] == [[P + i] * len(LENGTHS) for i in range(GEN)]


# --------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("name, params, message", [
    ("ar", dict(steps=0), "decoding.steps=0 must equal gen_length"),
    ("ar", dict(steps=2.5), "decoding.steps=2.5"),
    ("ar", dict(block_length=0), "decoding.block_length=0 must be an integer >= 1"),
    ("ar", dict(block_length="8"), "decoding.block_length='8'"),
    ("ar", dict(temperature=-0.1), r"decoding.temperature=-0.1 must be a number >= 0"),
    ("eb_sampler", dict(gamma=-0.1), r"decoding.gamma=-0.1 must be a number >= 0"),
    ("eb_sampler", dict(gamma=float("nan")), "decoding.gamma=nan"),
    ("eb_sampler", dict(gamma=True), "decoding.gamma=True"),
    ("eb_sampler", dict(gamma="0.1"), "decoding.gamma='0.1'"),
    ("eb_sampler", dict(error_proxy="margins"),
     r"decoding.error_proxy='margins' \(allowed: \['entropy', 'confidence', 'margin'\]\)"),
    ("eb_sampler", dict(block_length=-4), "decoding.block_length=-4"),
    ("eb_sampler", dict(temperature=-1), "decoding.temperature=-1"),
    ("eb_sampler", dict(steps=0), "decoding.steps=0"),
    ("eb_sampler", dict(threshold=0.9), "no parameter decoding.threshold"),
])
def test_bad_hyperparameters_are_refused(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_decoder(name, **params)


def test_eb_checks_its_blocks():
    with pytest.raises(ValueError, match="gen_length=20 is not divisible by block_length=8"):
        build_decoder("eb_sampler", block_length=8).check(20)


def test_yaml_defaults():
    ar = plan_run(compose("decoding=ar")).decoder
    assert (ar.name, ar.steps_asked, ar.block_length, ar.temperature) == ("ar", 64, None, 0.0)
    eb = plan_run(compose("decoding=eb_sampler")).decoder
    assert (eb.name, eb.gamma, eb.error_proxy, eb.block_length, eb.temperature) == ("eb_sampler", 0.1, "entropy", None, 0.0)
    assert not eb.order_known_in_advance and ar.order_known_in_advance
    assert eb.confidence_is_probability and ar.confidence_is_probability
    eb = plan_run(compose("decoding=eb_sampler", "decoding.gamma=inf", "decoding.block_length=32")).decoder
    assert eb.gamma == float("inf") and eb.block_length == 32
