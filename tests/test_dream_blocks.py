"""Block-wise Dream decoding (Fast-dLLM's Dream): blocks, per-block schedule, the first-token
rule, prefix/dual caches on top of it, and Dream's ``alg_temp`` (sampled position choice)."""
from __future__ import annotations

import math

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.dream import sample_positions
from dllm.decoding.loop import generate

from conftest import MASK_ID, compose, random_prompts, run_schedule, tiny_args, tiny_net

GEN, BLOCK = 16, 8


@pytest.fixture(scope="module")
def net():
    """A tiny Dream model (logit shift 1) that never predicts [MASK]."""
    return tiny_net(tiny_args("dream"), seed=5, logit_scale=4.0, silent_ids=(MASK_ID,))


def context(batch: int, prompt_length: int, gen_length: int) -> DecodeContext:
    T = prompt_length + gen_length
    return DecodeContext(batch, prompt_length, gen_length, MASK_ID, torch.ones(batch, T, dtype=torch.bool), None,
                         torch.device("cpu"), logit_shift=1)


class Recording:
    """Wraps a cache method; keeps each step's plan, the tokens before it, and what it committed."""

    def __init__(self, inner):
        self.inner, self.plans, self.before, self.committed = inner, [], [], []
        self.needs_attention = inner.needs_attention

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def select(self, view):
        self.plans.append(view.plan)
        self.before.append(view.x.clone())
        return self.inner.select(view)

    def observe(self, view, outcome):
        self.committed.append(outcome.transferred.clone())
        return self.inner.observe(view, outcome)


def dream(**params):
    return build_decoder("dream", **params)


# --------------------------------------------------------------------------- whole response unchanged


@pytest.mark.parametrize("params", [
    dict(steps=8, alg="entropy"),
    dict(steps=8, alg="maskgit_plus"),
    dict(steps=8, alg="topk_margin"),
    dict(steps=8, alg="origin", temperature=1.0),
    dict(steps=8, alg="entropy", temperature=0.7, top_p=0.9),
])
def test_block_length_null_is_the_whole_response(net, params):
    """block_length null (and the other new options at their defaults) = the decoder built without
    them = one block of the whole response."""
    prompts = random_prompts([7, 3, 5], seed=21)

    def run(**extra):
        gen = torch.Generator().manual_seed(4)
        return generate(net, prompts, dream(**params, **extra), build_cache("none"), GEN, generator=gen).tokens

    plain = run()
    assert torch.equal(run(block_length=None, first_token="schedule", alg_temp=None), plain)
    assert torch.equal(run(alg_temp=0), plain)
    assert torch.equal(run(block_length=GEN), plain)
    assert not torch.equal(run(block_length=4), plain)  # the premise: blocks do change the result


def test_whole_response_plan_is_one_block():
    P = 2
    ctx = context(1, P, GEN)
    masked = torch.zeros(1, P + GEN, dtype=torch.bool)
    masked[:, P:] = True
    plans, _ = run_schedule(dream(steps=4, alg="entropy"), ctx, masked)
    assert [(p.window, p.block, p.block_step) for p in plans] == [((P, P + GEN), 0, i) for i in range(4)]


# --------------------------------------------------------------------------- the per-block schedule


def test_per_block_schedule_hand_computed():
    """gen 20, blocks of 10, steps 6: 3 steps per block, timesteps = linspace(1, 1e-3, 4)
    = [1, .667, .334, .001] (per block, not over the whole response). k = int(n (1 - s/t)):

    n=10: 10 * (1 - .667) = 3.33 -> 3; 7 * (1 - .334/.667) = 7 * .49925 = 3.49 -> 3; last: the 4 left.
    n=6:   6 * .333 = 1.998 -> 1;       5 * .49925 = 2.50 -> 2;                     last: the 3 left.
    (Over the whole response the same steps would be linspace(1, 1e-3, 7).)
    """
    P, G = 3, 20
    ctx = context(2, P, G)
    masked = torch.zeros(2, P + G, dtype=torch.bool)
    masked[:, P:] = True
    masked[1, [P + 12, P + 14, P + 16, P + 18]] = False  # row 1: 6 masked in the second block
    decoder = dream(steps=6, alg="maskgit_plus", block_length=10)
    plans, left = run_schedule(decoder, ctx, masked)
    assert decoder.timesteps == pytest.approx([1.0, 0.667, 0.334, 0.001])
    assert [p.n_transfer.tolist() for p in plans] == [[3, 3], [3, 3], [4, 4], [3, 1], [3, 2], [4, 3]]
    assert [p.window for p in plans] == [(3, 13)] * 3 + [(13, 23)] * 3
    assert [p.block for p in plans] == [0, 0, 0, 1, 1, 1]
    assert [p.block_step for p in plans] == [0, 1, 2, 0, 1, 2]
    assert not left.any()


def test_first_token_commit_schedule_hand_computed():
    """Fast-dLLM's rule: the block-start step commits 1 token (the block's first position), then
    the schedule runs from ts[1]: 9 * (1 - .334/.667) = 4.49 -> 4, last: the 5 left;
    row 1's second block (6 masked): 1, then 5 * .49925 = 2.50 -> 2, last: the 3 left."""
    P, G = 3, 20
    ctx = context(2, P, G)
    masked = torch.zeros(2, P + G, dtype=torch.bool)
    masked[:, P:] = True
    masked[1, [P + 12, P + 14, P + 16, P + 18]] = False
    plans, left = run_schedule(dream(steps=6, alg="entropy", block_length=10, first_token="commit"), ctx, masked)
    assert [p.n_transfer.tolist() for p in plans] == [[1, 1], [4, 4], [5, 5], [1, 1], [4, 2], [5, 3]]
    assert [p.block_step for p in plans] == [0, 1, 2, 0, 1, 2]
    assert not left.any()


def test_first_token_commit_with_one_step_per_block_commits_the_block():
    """One step per block: the block-start step is also the last one, so it commits everything
    (the reference would leave the rest of the block masked)."""
    P = 2
    ctx = context(1, P, GEN)
    masked = torch.zeros(1, P + GEN, dtype=torch.bool)
    masked[:, P:] = True
    plans, left = run_schedule(dream(steps=2, block_length=BLOCK, first_token="commit"), ctx, masked)
    assert [p.n_transfer.tolist() for p in plans] == [[BLOCK], [BLOCK]]
    assert not left.any()


@pytest.mark.parametrize("first_token", ["schedule", "commit"])
def test_blocks_decode_left_to_right(net, first_token):
    """In a real generation every commit lies in the step's window, and a block is complete
    when the next one starts."""
    prompts = random_prompts([7, 3], seed=22)
    cache = Recording(build_cache("none"))
    out = generate(net, prompts, dream(steps=8, block_length=4, first_token=first_token), cache, GEN)
    P = max(len(p) for p in prompts)
    assert [(p.window, p.block, p.block_step) for p in cache.plans] == [
        ((P + 4 * b, P + 4 * b + 4), b, s) for b in range(4) for s in range(2)
    ]
    for step, (plan, committed, before) in enumerate(zip(cache.plans, cache.committed, cache.before)):
        lo, hi = plan.window
        assert not committed[:, :lo].any() and not committed[:, hi:].any(), f"step {step}"
        if plan.block_step == 0:
            assert not (before[:, P:lo] == MASK_ID).any(), f"block {plan.block} started early"
    assert not (out.tokens == MASK_ID).any()


# --------------------------------------------------------------------------- the first-token rule


def test_first_token_rule_hand_checked(net):
    """At each block start the only commit is the block's first position, with the token Dream
    predicts for it from that forward (position lo - 1's argmax); the rest of the block follows."""
    prompt = random_prompts([6], seed=23)[0]
    steps = 4  # 2 per block: under the plain schedule the block start would commit int(8 x .4995) = 3
    cache = Recording(build_cache("none"))
    generate(net, [prompt], dream(steps=steps, alg="entropy", block_length=BLOCK, first_token="commit"), cache, GEN)
    first_not_best = 0
    for step, (plan, before, committed) in enumerate(zip(cache.plans, cache.before, cache.committed)):
        lo, hi = plan.window
        if plan.block_step != 0:
            assert committed[0, lo:hi].sum() == (before[0, lo:hi] == MASK_ID).sum()  # the last step: all left
            continue
        expected = torch.zeros_like(committed)
        expected[0, lo] = True
        assert torch.equal(committed, expected), f"block {plan.block}"
        logits = net(before)[0].float()  # full forward of the block start, unshifted
        predicted = logits[lo - 1].clone()
        predicted[MASK_ID] = float("-inf")
        after = cache.before[step + 1]  # the tokens once this step is committed
        assert after[0, lo] == predicted.argmax(), f"block {plan.block}: the first position's token"
        # the premise: by Dream's confidence the first position is not the obvious choice
        probs = logits[lo - 1 : hi - 1].softmax(-1)
        neg_entropy = (probs * torch.log(probs + 1e-10)).sum(-1)
        first_not_best += int(neg_entropy.argmax() != 0)
    assert first_not_best >= 1, "pick another seed: the first position was always the most confident"


def test_first_token_rule_changes_the_result(net):
    prompts = random_prompts([6, 9], seed=24)
    runs = {rule: generate(net, prompts, dream(steps=4, block_length=BLOCK, first_token=rule), build_cache("none"), GEN)
            for rule in ("schedule", "commit")}
    assert not torch.equal(runs["schedule"].tokens, runs["commit"].tokens)


def reference_block_dream(net, prompt, gen_length, block_length, steps, eps=1e-3, commit_first=True):
    """Fast-dLLM's block-wise Dream (dream/model/generation_utils_block.py), batch 1, every step a
    full forward, entropy confidence, top-k positions — written out independently of dream.py."""
    x = torch.tensor([prompt + [MASK_ID] * gen_length])
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    ts = torch.linspace(1, eps, per_block + 1, dtype=torch.float64).tolist()
    for b in range(n_blocks):
        lo = len(prompt) + b * block_length
        hi = lo + block_length
        for i in range(per_block):
            logits = net(x)[0].float()
            logits = torch.cat([logits[:1], logits[:-1]])  # prediction of j from j - 1
            probs = logits.softmax(-1)  # over the whole vocabulary, [MASK] included
            tokens = logits.clone().index_fill_(1, torch.tensor([MASK_ID]), float("-inf")).argmax(-1)
            if commit_first and i == 0 and per_block > 1:
                x[0, lo] = tokens[lo]
                continue
            masked = (x[0] == MASK_ID).nonzero().flatten()
            masked = masked[(masked >= lo) & (masked < hi)]
            n = len(masked) if i == per_block - 1 else int(len(masked) * (1 - ts[i + 1] / ts[i]))
            neg_entropy = (probs * torch.log(probs + 1e-10)).sum(-1)
            chosen = masked[neg_entropy[masked].topk(n).indices] if n else masked[:0]
            x[0, chosen] = tokens[chosen]
    return x[0, len(prompt):]


@pytest.mark.parametrize("commit_first", [True, False])
@pytest.mark.parametrize("steps, block", [(8, 8), (16, 4), (4, 16)])
def test_matches_a_written_out_reference(net, commit_first, steps, block):
    prompt = random_prompts([7], seed=25)[0]
    rule = "commit" if commit_first else "schedule"
    ours = generate(net, [prompt], dream(steps=steps, alg="entropy", block_length=block, first_token=rule),
                    build_cache("none"), GEN).tokens[0]
    assert ours.tolist() == reference_block_dream(net, prompt, GEN, block, steps, commit_first=commit_first).tolist()


# --------------------------------------------------------------------------- prefix and dual caches


CASES = [
    dict(steps=GEN, alg="entropy", block_length=BLOCK),
    dict(steps=8, alg="maskgit_plus", block_length=BLOCK, first_token="commit"),
    dict(steps=8, alg="entropy", block_length=4, first_token="commit"),
    dict(steps=8, alg="topk_margin", block_length=BLOCK, alg_temp=0.5),
    dict(steps=8, alg="origin", block_length=BLOCK, temperature=1.0),
]


@pytest.mark.parametrize("method", ["prefix", "dual"])
@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(str(v) for v in p.values()))
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_prefix_dual_refresh_every_step_reproduce_none(net, method, params, lengths):
    prompts = random_prompts(lengths, seed=26)

    def run(cache):
        gen = torch.Generator().manual_seed(9)
        return generate(net, prompts, dream(**params), cache, GEN, generator=gen)

    base = run(build_cache("none"))
    forced = run(build_cache(method, refresh_interval=1))
    assert torch.equal(forced.tokens, base.tokens)
    assert forced.recompute_ratio == 1.0


@pytest.mark.parametrize("method", ["prefix", "dual"])
@pytest.mark.parametrize("first_token", ["schedule", "commit"])
def test_prefix_dual_refresh_at_block_starts_only(net, method, first_token):
    """Without a refresh interval the cache runs a full forward exactly at the block starts (it
    reads plan.block_step), and partial forwards elsewhere still decode every position."""
    prompts = random_prompts([7, 3], seed=27)
    out = generate(net, prompts, dream(steps=GEN, block_length=BLOCK, first_token=first_token), build_cache(method),
                   GEN, record_trace=True)
    full = [bool(active.all()) for active in out.trace]
    assert full == [step % BLOCK == 0 for step in range(GEN)]
    assert out.recompute_ratio < 1.0
    assert not (out.tokens == MASK_ID).any()


@pytest.mark.parametrize("method,suffix", [("prefix", True), ("dual", False)])
def test_commit_rule_recomputes_the_unshifted_region(net, method, suffix):
    """With first_token=commit the block's first position is decoded at the block start, so the
    cached steps recompute exactly the block (prefix: the block and everything after), the rows
    NVlabs' Dream code runs; under the plain schedule row lo - 1 joins while lo is masked."""
    prompts = random_prompts([6, 4], seed=30)
    P, T = 6, 6 + GEN
    shifted_rows = 0
    for rule in ("commit", "schedule"):
        cache = Recording(build_cache(method))
        out = generate(net, prompts, dream(steps=8, block_length=BLOCK, first_token=rule), cache, GEN,
                       record_trace=True)
        for step, (active, plan, before) in enumerate(zip(out.trace, cache.plans, cache.before)):
            if plan.block_step == 0:
                assert active.all()
                continue
            lo = P + plan.block * BLOCK
            expected = torch.zeros(2, T, dtype=torch.bool)
            expected[:, lo : T if suffix else lo + BLOCK] = True
            if rule == "commit":
                assert not (before[:, lo] == MASK_ID).any(), f"step {step}"
            else:
                expected[:, lo - 1] = before[:, lo] == MASK_ID
                shifted_rows += int(expected[:, lo - 1].sum())
            assert torch.equal(active, expected), f"{rule} step {step}"
    assert shifted_rows > 0  # the premise: the plain schedule leaves some block's first position masked


# --------------------------------------------------------------------------- alg_temp


def test_sample_positions_follows_softmax_of_confidence_over_alg_temp():
    """n=1 draws from [p, q, r] with score log p etc.: frequencies = softmax(score / alg_temp)."""
    score = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1), float("-inf")]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    for alg_temp, expected in [(1.0, [0.6, 0.3, 0.1]), (2.0, None)]:
        if expected is None:  # softmax(log p / 2) ∝ sqrt(p)
            roots = [math.sqrt(p) for p in (0.6, 0.3, 0.1)]
            expected = [r / sum(roots) for r in roots]
        counts = torch.zeros(4)
        for _ in range(draws):
            counts += sample_positions(score, torch.tensor([1]), alg_temp, gen)[0].float()
        assert counts[3] == 0
        assert (counts[:3] / draws).tolist() == pytest.approx(expected, abs=0.03)


def test_sample_positions_count_eligibility_and_limits():
    inf = float("-inf")
    score = torch.tensor([[0.9, inf, 0.2, 0.5, inf], [inf, 0.1, inf, inf, 0.3]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        chosen = sample_positions(score, torch.tensor([2, 1]), 1.0, gen)
        assert chosen.sum(1).tolist() == [2, 1]
        assert not chosen[torch.isinf(score)].any()
    # a tiny alg_temp is top-k (the softmax underflows: the rest is filled by score)
    chosen = sample_positions(score, torch.tensor([2, 2]), 1e-6, gen)
    assert chosen.tolist() == [[True, False, False, True, False], [False, True, False, False, True]]


def test_alg_temp_is_seeded_reproducible_and_differs_from_top_k(net):
    prompts = random_prompts([6, 4], seed=28)

    def run(seed, **params):
        gen = torch.Generator().manual_seed(seed)
        return generate(net, prompts, dream(steps=8, alg="maskgit_plus", block_length=BLOCK, **params),
                        build_cache("none"), GEN, generator=gen).tokens

    greedy = run(0)
    assert torch.equal(greedy, run(1))  # top-k by confidence ignores the generator
    sampled = run(0, alg_temp=1.0)
    assert torch.equal(sampled, run(0, alg_temp=1.0))
    assert any(not torch.equal(sampled, run(seed, alg_temp=1.0)) for seed in (1, 2, 3)), "the seed has no effect"
    assert any(not torch.equal(greedy, run(seed, alg_temp=1.0)) for seed in (0, 1, 2)), "alg_temp has no effect"
    assert not (sampled == MASK_ID).any()


def test_alg_temp_whole_response(net):
    """alg_temp also works without blocks (Dream's own generation)."""
    prompts = random_prompts([6], seed=29)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = generate(net, prompts, dream(steps=8, alg_temp=0.5), build_cache("none"), GEN, generator=gen()).tokens
    b = generate(net, prompts, dream(steps=8, alg_temp=0.5), build_cache("none"), GEN, generator=gen()).tokens
    assert torch.equal(a, b) and not (a == MASK_ID).any()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("params, message", [
    (dict(first_token="first"), r"first_token='first' \(allowed: \['schedule', 'commit'\]\)"),
    (dict(first_token=None), r"first_token=None \(allowed"),
    (dict(alg_temp=-0.5), r"alg_temp=-0.5 must be a finite number >= 0"),
    (dict(alg_temp=float("inf")), r"alg_temp=inf must be a finite number >= 0"),
    (dict(alg_temp="hot"), r"alg_temp='hot'"),
    (dict(alg_temp=0.5, alg="origin"), r"alg_temp=0.5 .*allowed with alg: \['maskgit_plus', 'topk_margin', 'entropy'\]"),
    (dict(block_length=0), r"block_length=0 must be >= 1"),
])
def test_bad_values_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        dream(**{"steps": 8, **params})


@pytest.mark.parametrize("params, gen_length, message", [
    (dict(steps=8, block_length=5), 16, r"gen_length=16 is not divisible by block_length=5"),
    (dict(steps=3, block_length=8), 16, r"steps=3 is not divisible by the number of blocks \(2\)"),
    (dict(steps=32, block_length=4), 16, r"steps per block \(8\) exceed block_length=4"),
])
def test_check_refuses_bad_block_settings(net, params, gen_length, message):
    decoder = dream(**params)
    with pytest.raises(ValueError, match=message):
        decoder.check(gen_length)
    with pytest.raises(ValueError, match=message):  # before any forward
        generate(net, [[1, 2, 3]], dream(**params), build_cache("none"), gen_length)


def test_config_options():
    """conf/decoding/dream.yaml carries the options (defaults: whole response, plain schedule,
    top-k) and the run plan refuses a bad value before any model loads."""
    from dllm.pipeline import plan_run

    cfg = compose("decoding=dream")
    assert cfg.decoding.block_length is None and cfg.decoding.first_token == "schedule" and cfg.decoding.alg_temp is None
    plan = plan_run(compose("decoding=dream", "gen_length=16", "decoding.steps=8", "decoding.block_length=8",
                            "decoding.first_token=commit", "decoding.alg_temp=0.2"))
    assert (plan.decoder.block_length, plan.decoder.first_token, plan.decoder.alg_temp) == (8, "commit", 0.2)
    with pytest.raises(ValueError, match="first_token='always'"):
        plan_run(compose("decoding=dream", "decoding.first_token=always"))
