"""d²Cache's reference-code rules: ``cache.reference_rules`` and one option per rule, hand-traced.

The authors' code (github.com/Kamichanw/d2Cache) departs from the paper's text in five places
(see dllm/cache/d2cache.py): (a) stage 2 keeps cumulative mass <= p, (b) stage-2 candidates include
still-masked positions, (c) the stage-1 confidence cache is never refreshed after step 0, (d) its
"recomputed this step" decoding filter is a no-op (not emulated: a loop rule), (e) on Dream it
assigns row P-1 from S1 instead of OR-ing it. Each rule is checked on small hand-traced tensors,
then on short generations of tiny random models (conftest helpers) against a plain re-reading of
the rules, with a check that the rule really changes the active set there.
"""
from __future__ import annotations


import pytest
import torch

from conftest import EOS_ID, MASK_ID, PAD_ID, compose, random_prompts, tiny_args, tiny_net
from dllm.cache.base import CacheMethod, StepOutcome, StepView, build_cache
from dllm.cache.d2cache import RULES, nucleus, resolve_rules
from dllm.decoding.base import DecodeContext, StepPlan, build_decoder
from dllm.decoding.density import certainty_density
from dllm.decoding.loop import generate, shift_to_computing

PAPER = {name: values[0] for name, values in RULES.items()}
REFERENCE = {name: values[1] for name, values in RULES.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


def picked(mask: torch.Tensor) -> list[int]:
    return mask[0].nonzero().flatten().tolist()


# ------------------------------------------------------------------------------ (a) the nucleus rule

# Exact binary fractions (1/2, 1/4, 5/32, 3/32, 0): cumulative masses .5, .75, .90625, 1, 1.
IMPORTANCE = torch.tensor([[0.5, 0.25, 0.15625, 0.09375, 0.0]])
EVERY = torch.ones(1, 5, dtype=torch.bool)


@pytest.mark.parametrize("p,reach,within", [
    (0.1, [0], [0]),  # at least one either way
    (0.5, [0], [0]),  # .5 reaches .5 / .5 <= .5
    (0.7, [0, 1], [0]),  # reach needs .75; within stops before exceeding .7
    (0.75, [0, 1], [0, 1]),
    (0.9, [0, 1, 2], [0, 1]),  # .90625 > .9
    (0.95, [0, 1, 2, 3], [0, 1, 2]),
    (1.0, [0, 1, 2, 3], [0, 1, 2, 3, 4]),  # within keeps the zero-importance candidate (mass 1 <= 1)
])
def test_nucleus_reach_and_within_hand_traced(p, reach, within):
    assert picked(nucleus(IMPORTANCE, EVERY, p, "reach")) == reach
    assert picked(nucleus(IMPORTANCE, EVERY, p)) == reach  # reach is the default
    assert picked(nucleus(IMPORTANCE, EVERY, p, "within")) == within
    # The order of positions does not matter, only their importance.
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert sorted(perm[picked(nucleus(IMPORTANCE[:, perm], EVERY, p, "within"))].tolist()) == within


def test_nucleus_within_normalises_over_candidates():
    # Without position 0 the masses are (.25, .15625, .09375, 0) / .5 = (.5, .3125, .1875, 0).
    no_first = torch.tensor([[False, True, True, True, True]])
    assert picked(nucleus(IMPORTANCE, no_first, 0.5, "within")) == [1]
    assert picked(nucleus(IMPORTANCE, no_first, 0.8, "within")) == [1]  # .8125 > .8
    assert picked(nucleus(IMPORTANCE, no_first, 0.82, "within")) == [1, 2]
    assert picked(nucleus(IMPORTANCE, no_first, 0.51, "reach")) == [1, 2]
    none = torch.zeros(1, 5, dtype=torch.bool)
    assert not nucleus(IMPORTANCE, none, 0.5, "within").any()
    with pytest.raises(ValueError, match="'most'.*'reach', 'within'"):
        nucleus(IMPORTANCE, EVERY, 0.5, "most")


def plain_nucleus(importance: list[float], candidates: list[bool], p: float, mass: str) -> set[int]:
    """The two stage-2 rules read plainly: walk the candidates by decreasing importance."""
    idx = [i for i, c in enumerate(candidates) if c]
    if not idx:
        return set()
    total = sum(importance[i] for i in idx)
    chosen: list[int] = []
    cum = 0.0
    for i in sorted(idx, key=lambda i: -importance[i]):
        share = importance[i] / total if total > 0 else 0.0
        if chosen:
            if mass == "reach" and (cum >= p or share == 0):
                break  # p already reached: the set is the smallest one
            if mass == "within" and cum + share > p:
                break  # the cumulative mass would exceed p
        chosen.append(i)
        cum += share
    return set(chosen)


@pytest.mark.parametrize("mass", ["reach", "within"])
def test_nucleus_matches_the_plain_reading_on_random_rows(mass):
    gen = torch.Generator().manual_seed(0)
    for p in (0.05, 0.1, 0.3, 0.6, 0.9):
        importance = torch.rand(6, 24, generator=gen) ** 3
        candidates = torch.rand(6, 24, generator=gen) < 0.6
        got = nucleus(importance, candidates, p, mass)
        for b in range(6):
            want = plain_nucleus(importance[b].tolist(), candidates[b].tolist(), p, mass)
            assert set(got[b].nonzero().flatten().tolist()) == want, (p, b)


# ----------------------------------------------------------------------------------- the options

def test_defaults_are_the_papers_reading():
    cache = build_cache("d2cache")
    assert {name: getattr(cache, name) for name in RULES} == PAPER
    assert resolve_rules() == PAPER
    assert cache.reference_rules is False


def test_reference_rules_sets_every_rule():
    cache = build_cache("d2cache", reference_rules=True)
    assert {name: getattr(cache, name) for name in RULES} == REFERENCE
    assert REFERENCE == dict(stage2_mass="within", stage2_candidates="all", stage1_confidence="step0",
                             dream_first_row="overwrite", tie_break="topk")
    assert resolve_rules(True) == REFERENCE


@pytest.mark.parametrize("name", list(RULES))
def test_an_explicit_option_wins_over_reference_rules(name):
    # reference_rules=true + one option at the paper's value = the reference minus that rule.
    cache = build_cache("d2cache", reference_rules=True, **{name: PAPER[name]})
    assert {n: getattr(cache, n) for n in RULES} == {**REFERENCE, name: PAPER[name]}
    # ... and one option alone switches that rule only.
    cache = build_cache("d2cache", **{name: REFERENCE[name]})
    assert {n: getattr(cache, n) for n in RULES} == {**PAPER, name: REFERENCE[name]}


@pytest.mark.parametrize("params,needle", [
    (dict(stage2_mass="most"), r"cache\.stage2_mass='most' \(allowed: \['reach', 'within'\]"),
    (dict(stage2_candidates="masked"), r"cache\.stage2_candidates='masked' \(allowed: \['known', 'all'\]"),
    (dict(stage1_confidence="frozen"), r"cache\.stage1_confidence='frozen' \(allowed: \['refreshed', 'step0'\]"),
    (dict(dream_first_row="and"), r"cache\.dream_first_row='and' \(allowed: \['or', 'overwrite'\]"),
    (dict(reference_rules="yes"), r"cache\.reference_rules='yes' must be true or false"),
    (dict(decode_stale=True), r"no parameter cache\.decode_stale"),  # rule (d) is not an option
])
def test_bad_rule_options_are_refused_by_name(params, needle):
    with pytest.raises(ValueError, match=needle):
        build_cache("d2cache", **params)


# ------------------------------------------------------------- hand-traced select() / observe()

P, G = 3, 5
T = P + G


def hand_state(family: str, masked: list[int], transferred: list[int], importance: list[float],
               confidence: dict[int, float], sigma: float = 100.0, k: int = 1, p: float = 0.3, **rules):
    """A d2cache after one step of a batch-1 generation (prompt 0..2, response 3..7): its select()."""
    cache = build_cache("d2cache", k=k, p=p, sigma=sigma, **rules)
    real = torch.ones(1, T, dtype=torch.bool)
    shift = 1 if family == "dream" else 0
    cache.start(DecodeContext(1, P, G, MASK_ID, real, None, torch.device("cpu"), shift))
    cache.importance = torch.tensor([importance])
    cache.transferred = torch.zeros(1, T, dtype=torch.bool)
    cache.transferred[0, transferred] = True
    for pos, value in confidence.items():
        cache.confidence[0, pos] = value
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, masked] = True
    plan = StepPlan(window=(P, T), n_transfer=torch.tensor([1]), block=0, block_step=1)
    request = cache.select(StepView(1, plan, torch.zeros(1, T, dtype=torch.long), mask))
    active = request.refresh | shift_to_computing(request.predict, shift)
    return request, active


# Step 1 of a hand-traced generation: 5, 6, 7 still masked, 4 decoded in step 0. With sigma 100 the
# density is nearly flat, so S1 (k=1) is the masked position of highest confidence: 6.
STATE = dict(masked=[5, 6, 7], transferred=[4], importance=[1, 2, 1, 1, 50, 8, 100, 6],
             confidence={5: 0.1, 6: 0.9, 7: 0.2})


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_stage2_candidates_known_hand_traced(family):
    # Candidates: the known positions but the one just decoded, {0, 1, 2, 3}, masses (1, 2, 1, 1)/5:
    # position 1 (.4) reaches p=.3 alone.
    request, active = hand_state(family, **STATE)
    assert picked(request.predict) == [6]
    assert picked(request.refresh) == [1, 4]  # S2 + S_new
    assert picked(active) == ([1, 4, 6] if family == "llada" else [1, 4, 5])


def test_stage2_candidates_all_hand_traced_llada():
    # Candidates: every position but S_new {4} and S1's row {6}: {0, 1, 2, 3, 5, 7}, masses
    # (1, 2, 1, 1, 8, 6)/19. The still-masked 5 (8/19 = .42) reaches p=.3 alone.
    request, active = hand_state("llada", stage2_candidates="all", **STATE)
    assert picked(request.refresh) == [4, 5]
    assert picked(active) == [4, 5, 6]
    # p = .6: 5 then 7 (14/19 = .74) reach it; within .6 only 5 (8/19 <= .6 < 14/19).
    request, _ = hand_state("llada", stage2_candidates="all", **STATE, p=0.6)
    assert picked(request.refresh) == [4, 5, 7]
    request, _ = hand_state("llada", stage2_candidates="all", stage2_mass="within", **STATE, p=0.6)
    assert picked(request.refresh) == [4, 5]


def test_stage2_candidates_all_hand_traced_dream():
    # On Dream S1's row is 6 - 1 = 5: 5 is no candidate, but 6 itself is (its prediction comes from
    # row 5): {0, 1, 2, 3, 6, 7}, masses (1, 2, 1, 1, 100, 6)/111; 6 (.9) reaches p=.3 alone.
    request, active = hand_state("dream", stage2_candidates="all", **STATE)
    assert picked(request.predict) == [6]
    assert picked(request.refresh) == [4, 6]
    assert picked(active) == [4, 5, 6]
    # Without 6's weight: {0, 1, 2, 3, 6, 7} masses (1, 2, 1, 1, 0, 6)/11; 7 (.55) alone.
    request, active = hand_state("dream", stage2_candidates="all", **{**STATE, "importance": [1, 2, 1, 1, 50, 8, 0, 6]})
    assert picked(request.refresh) == [4, 7]
    assert picked(active) == [4, 5, 7]


# The last prompt row 2 dominates the rollout; S1 is either 5 (first response position 3 known) or 3.
FIRST_ROW = dict(transferred=[4], importance=[1, 1, 40, 1, 1, 1, 1, 1], sigma=100.0)


@pytest.mark.parametrize("rule,family,first_in_s1,row_p_minus_1_active", [
    ("or", "dream", False, True),  # S2 picked row 2: kept
    ("overwrite", "dream", False, False),  # dropped: row 2 = "first response position in S1" = False
    ("or", "dream", True, True),
    ("overwrite", "dream", True, True),  # row 2 computes position 3's prediction
    ("overwrite", "llada", False, True),  # no effect on LLaDA (the reference applies it to Dream only)
])
def test_dream_first_row_hand_traced(rule, family, first_in_s1, row_p_minus_1_active):
    masked, confidence = ([3, 5], {3: 0.9, 5: 0.1}) if first_in_s1 else ([5, 6], {5: 0.9, 6: 0.1})
    request, active = hand_state(family, masked=masked, confidence=confidence, dream_first_row=rule, **FIRST_ROW)
    assert picked(request.predict) == [masked[0]]
    assert bool(active[0, P - 1]) == row_p_minus_1_active
    s2 = request.refresh & ~torch.tensor([[i in FIRST_ROW["transferred"] for i in range(T)]])
    assert bool(s2[0, P - 1]) == (rule == "or" or family == "llada")


def hand_outcome(fresh: dict[int, float], transferred: list[int], active: list[int]) -> StepOutcome:
    confidence = torch.full((1, T), float("nan"), dtype=torch.float64)
    for pos, value in fresh.items():
        confidence[0, pos] = value
    act = torch.zeros(1, T, dtype=torch.bool)
    act[0, active] = True
    done = torch.zeros(1, T, dtype=torch.bool)
    done[0, transferred] = True
    rows = torch.tensor([active])
    attention = [torch.full((1, len(active), T), 1.0 / T)]
    return StepOutcome(act, done, confidence, rows, torch.ones_like(rows, dtype=torch.bool), attention)


@pytest.mark.parametrize("rule,s1_after_step1", [("refreshed", [4]), ("step0", [3])])
def test_stage1_confidence_hand_traced(rule, s1_after_step1):
    cache = build_cache("d2cache", k=1, p=0.3, sigma=100.0, stage1_confidence=rule)
    real = torch.ones(1, T, dtype=torch.bool)
    cache.start(DecodeContext(1, P, G, MASK_ID, real, None, torch.device("cpu")))
    plan = StepPlan(window=(P, T), n_transfer=torch.tensor([1]), block=0, block_step=0)
    x = torch.zeros(1, T, dtype=torch.long)

    def view(step, masked):
        mask = torch.zeros(1, T, dtype=torch.bool)
        mask[0, masked] = True
        return StepView(step, plan, x, mask)

    # Step 0: full forward, every response position predicted; 7 is decoded.
    v0 = view(0, [3, 4, 5, 6, 7])
    assert cache.select(v0).full
    cache.observe(v0, hand_outcome({3: 0.9, 4: 0.1, 5: 0.1, 6: 0.1, 7: 0.95}, [7], list(range(T))))
    # Step 1: S1 = {3} (confidence .9); 3 and 4 get fresh predictions (.05, .8); 6 is decoded.
    v1 = view(1, [3, 4, 5, 6])
    assert picked(cache.select(v1).predict) == [3]
    cache.observe(v1, hand_outcome({3: 0.05, 4: 0.8, 6: 0.99}, [6], [3, 4, 6, 7]))
    expected = {3: 0.05, 4: 0.8, 6: 0.99} if rule == "refreshed" else {3: 0.9, 4: 0.1, 6: 0.1}
    assert {pos: cache.confidence[0, pos].item() for pos in expected} == expected
    # Step 2: refreshed ranks 4 (.8) first; the step-0 cache still ranks 3 (.9) first.
    assert picked(cache.select(view(2, [3, 4, 5])).predict) == s1_after_step1


# ------------------------------------------------------------------- generations on tiny models

PROMPTS = random_prompts([7, 4, 10], seed=3)  # a left-padded batch of three
GEN = 16
BASE = dict(k=2, p=0.3, sigma=3.0)


def tiny(family: str):
    args = tiny_args(family, max_seq_len=64)
    return tiny_net(args, seed=11, logit_scale=4.0, silent_ids=(MASK_ID, PAD_ID, EOS_ID))


class Spy(CacheMethod):
    """Wraps a d2cache; records its state before each select(), its request and the step's outcome."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.needs_attention = inner, inner.name, inner.needs_attention
        self.steps: list[dict] = []

    def check(self, decoder) -> None:
        self.inner.check(decoder)

    def start(self, ctx) -> None:
        super().start(ctx)
        self.inner.start(ctx)

    def select(self, view: StepView):
        inner = self.inner
        state = dict(masked=view.masked.clone(), plan=view.plan,
                     importance=None if inner.importance is None else inner.importance.clone(),
                     transferred=None if inner.transferred is None else inner.transferred.clone())
        state["request"] = inner.select(view)
        self.steps.append(state)
        return state["request"]

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        self.steps[-1].update(active=outcome.active.clone(), done=outcome.transferred.clone(),
                              confidence=outcome.confidence.clone())
        self.inner.observe(view, outcome)


def run(family: str, **params):
    spy = Spy(build_cache("d2cache", **BASE, **params))
    out = generate(tiny(family), PROMPTS, build_decoder("certainty_prior", steps=GEN, sigma=3.0), spy, GEN)
    return spy, out


def expected_active(step: dict, real: torch.Tensor, conf: torch.Tensor, rules: dict, shift: int) -> torch.Tensor:
    """The active set of a step re-derived from the recorded state, reading each rule plainly."""
    masked, transferred, importance = step["masked"], step["transferred"], step["importance"]
    P0 = real.shape[1] - GEN
    known = real & ~masked
    score = (conf * certainty_density(known, real, BASE["sigma"], "sum")).float()
    lo, hi = step["plan"].window
    width = max(BASE["k"], int(step["plan"].n_transfer.max()))
    active = torch.zeros_like(masked)
    for b in range(masked.shape[0]):
        pool = [i for i in range(lo, hi) if masked[b, i]]
        s1 = sorted(pool, key=lambda i: -score[b, i].item())[:width]
        s1_rows = {i - shift for i in s1}
        if rules["stage2_candidates"] == "known":
            cands = [bool(known[b, i] and not transferred[b, i]) for i in range(real.shape[1])]
        else:
            cands = [bool(real[b, i] and not transferred[b, i]) and not (i >= P0 and i in s1_rows)
                     for i in range(real.shape[1])]
        s2 = plain_nucleus(importance[b].tolist(), cands, BASE["p"], rules["stage2_mass"])
        if rules["dream_first_row"] == "overwrite" and shift == 1:
            s2.discard(P0 - 1)
        rows = s1_rows | s2 | set(transferred[b].nonzero().flatten().tolist())
        active[b, sorted(rows)] = True
    return active & real


def conf_track(spy: Spy, rule: str) -> list[torch.Tensor]:
    """The stage-1 confidence cache before each step, kept independently from the recorded outcomes."""
    conf = torch.zeros_like(spy.steps[0]["confidence"])
    seen = torch.zeros_like(conf, dtype=torch.bool)
    before = []
    for step in spy.steps:
        before.append(conf.clone())
        fresh = ~step["confidence"].isnan()
        if rule == "step0":
            fresh &= ~seen
        seen |= fresh
        conf = torch.where(fresh, step["confidence"], conf)
    return before


# dream_first_row has no effect on LLaDA (hand-traced above); tie_break only where scores tie (the
# hand trace ranks stably, as tie_break=earlier: test_a_padded_row_chooses_stage1_as_alone).
@pytest.mark.parametrize("family,rule", [(f, r) for f in ("llada", "dream") for r in RULES
                                         if (f, r) != ("llada", "dream_first_row") and r != "tie_break"])
def test_each_rule_changes_the_active_set_as_predicted(family, rule):
    spy, out = run(family, **{rule: REFERENCE[rule]})
    rules = {**PAPER, rule: REFERENCE[rule]}
    paper_rules = dict(PAPER)
    shift = 1 if family == "dream" else 0
    real = spy.inner.ctx.real
    conf = conf_track(spy, rules["stage1_confidence"])
    conf_paper = conf_track(spy, "refreshed")
    differs = 0
    assert spy.steps[0]["request"].full
    for s, step in enumerate(spy.steps[1:], start=1):
        assert not step["request"].full
        want = expected_active(step, real, conf[s], rules, shift)
        assert torch.equal(step["active"], want), f"step {s}"
        other = expected_active(step, real, conf_paper[s], paper_rules, shift)
        differs += int(not torch.equal(want, other))
    assert differs > 0, f"{rule}={REFERENCE[rule]} never changed the active set here"
    assert not (out.tokens == MASK_ID).any()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_reference_rules_generation(family):
    spy, out = run(family, reference_rules=True)
    shift = 1 if family == "dream" else 0
    real = spy.inner.ctx.real
    conf = conf_track(spy, "step0")
    for s, step in enumerate(spy.steps[1:], start=1):
        assert torch.equal(step["active"], expected_active(step, real, conf[s], REFERENCE, shift)), f"step {s}"
        # Rule (d) is not emulated: only positions whose prediction was recomputed are committed.
        predicted = torch.zeros_like(step["active"])
        predicted[:, shift:] = step["active"][:, : step["active"].shape[1] - shift]
        assert not (step["done"] & ~predicted).any()
    # The stage-1 cache holds step 0's confidences (the whole response was predicted at step 0).
    step0 = spy.steps[0]["confidence"]
    assert torch.equal(spy.inner.confidence[~step0.isnan()], step0[~step0.isnan()])
    assert not (out.tokens == MASK_ID).any()


def test_paper_rules_spelled_out_keep_the_golden_outputs():
    """The defaults, and the paper's values given explicitly with a model family, change nothing."""
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "golden" / "outputs.json").read_text())
    for family in ("llada", "dream"):
        for params in ({}, dict(reference_rules=False, **PAPER)):
            spy, out = run(family, **params)
            assert out.tokens.tolist() == golden[f"{family}/d2cache/certainty_prior"]["tokens"]
            assert out.nfe == golden[f"{family}/d2cache/certainty_prior"]["nfe"]


# --------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("model", ["tiny_llada", "tiny_dream"])
def test_cache_config_follows_the_paper_by_default(model):
    cfg = compose("cache=d2cache", f"model={model}")
    assert cfg.cache.reference_rules is False
    assert all(cfg.cache[name] is None for name in RULES)  # null: follow reference_rules


@pytest.mark.parametrize("model", ["llada", "dream"])
def test_d2cache_table1_uses_the_reference_rules(model):
    cfg = compose("+experiment=d2cache_table1", "method=d2cache", f"model={model}")
    assert cfg.cache.reference_rules is True
    params = {key: value for key, value in cfg.cache.items() if key != "name"}
    cache = build_cache("d2cache", **params)
    assert {name: getattr(cache, name) for name in RULES} == REFERENCE


# ------------------------------------------------------------------------------ ties in stage 1
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_padded_row_chooses_stage1_as_alone(family):
    """Under a block decoder with k < block_length, the positions of a block never predicted before its
    first step all score 0 in stage 1: tie_break=earlier takes the earlier ones, whatever the row's
    padding (torch.topk's order among ties depends on the row's width; this batch showed it)."""
    net = tiny_net(tiny_args(family, max_seq_len=64), seed=11, logit_scale=4.0, silent_ids=(MASK_ID, PAD_ID, EOS_ID))
    prompts = random_prompts([7, 4, 10], seed=3)

    def run(batch):
        return generate(net, batch, build_decoder("low_confidence", steps=16, block_length=8),
                        build_cache("d2cache", k=2, p=0.3, sigma=3.0), 16).tokens

    assert torch.equal(run(prompts), torch.cat([run([p]) for p in prompts]))
