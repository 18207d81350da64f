"""Decoding policies: schedules on hand-computed cases, densities, determinism, batch = one by one,
input validation, and that every response position ends decoded."""
from __future__ import annotations

import math
import re

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import DecodeContext, build_decoder, decoder_names, llada_transfer_counts
from dllm.decoding.density import certainty_density
from dllm.decoding.loop import generate

from conftest import run_schedule, with_weights

@pytest.fixture
def net_of(make_args, make_net):
    """A tiny model of each family with peaked predictions (built once per test)."""
    nets = {}

    def get(family: str, block_causal: bool = False):
        if (family, block_causal) not in nets:
            nets[family, block_causal] = make_net(make_args(family, block_causal=block_causal), seed=100, logit_scale=3.0)
        return nets[family, block_causal]

    return get


def context(batch: int, prompt_length: int, gen_length: int, mask_id: int = 63) -> DecodeContext:
    T = prompt_length + gen_length
    return DecodeContext(batch, prompt_length, gen_length, mask_id, torch.ones(batch, T, dtype=torch.bool), None, torch.device("cpu"))


# --------------------------------------------------------------------------- schedules


def test_llada_transfer_counts_hand_computed():
    assert llada_transfer_counts(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    counts = llada_transfer_counts(torch.tensor([8, 7, 3, 0, 12]), 4)
    assert counts.tolist() == [[2, 2, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0], [0, 0, 0, 0], [3, 3, 3, 3]]
    assert counts.dtype == torch.long


def test_low_confidence_one_block_plan():
    P, G = 5, 10
    ctx = context(1, P, G)
    masked = torch.zeros(1, P + G, dtype=torch.bool)
    masked[:, P:] = True
    plans, left = run_schedule(build_decoder("low_confidence", steps=4), ctx, masked)
    assert [p.n_transfer.tolist() for p in plans] == [[3], [3], [2], [2]]
    assert all(p.window == (P, P + G) and p.block == 0 for p in plans)
    assert [p.block_step for p in plans] == [0, 1, 2, 3]
    assert not left.any()


def test_low_confidence_blocks_plan():
    """gen 16, block 8, steps 4: two steps per block; a row with pre-known tokens gets fewer per step."""
    P, G = 3, 16
    ctx = context(2, P, G)
    masked = torch.zeros(2, P + G, dtype=torch.bool)
    masked[:, P:] = True
    masked[1, [P + 8, P + 9, P + 10]] = False  # row 1: only 5 masked in the second block
    plans, left = run_schedule(build_decoder("low_confidence", steps=4, block_length=8), ctx, masked)
    assert [p.window for p in plans] == [(3, 11), (3, 11), (11, 19), (11, 19)]
    assert [p.block for p in plans] == [0, 0, 1, 1]
    assert [p.block_step for p in plans] == [0, 1, 0, 1]
    assert [p.n_transfer.tolist() for p in plans] == [[4, 4], [4, 4], [4, 3], [4, 2]]
    assert not left.any()


def test_dream_schedule_hand_computed():
    """timesteps = linspace(1, 1e-3, 5) = [1, .75025, .5005, .25075, .001]; k = int(n (1 - s/t)).

    n=20: 20*.24975=4.995 -> 4; 16*.33289=5.33 -> 5; 11*.49900=5.49 -> 5; last step: the 6 left.
    n=8:   8*.24975=1.998 -> 1;  7*.33289=2.33 -> 2;  5*.49900=2.50 -> 2; last step: the 3 left.
    """
    P, G = 2, 20
    ctx = context(2, P, G)
    masked = torch.zeros(2, P + G, dtype=torch.bool)
    masked[:, P:] = True
    masked[1, P : P + 12] = False  # row 1 has 8 masked tokens
    decoder = build_decoder("dream", steps=4, alg="maskgit_plus", eps=1e-3)
    plans, left = run_schedule(decoder, ctx, masked)
    assert decoder.timesteps == pytest.approx([1.0, 0.75025, 0.5005, 0.25075, 0.001])
    assert [p.n_transfer.tolist() for p in plans] == [[4, 1], [5, 2], [5, 2], [6, 3]]
    assert all(p.window == (P, P + G) for p in plans)
    assert not left.any()


def test_dream_confidence_threshold_hand_computed():
    """Fast-dLLM's Dream rule without a cache: quota gen/steps, the rejected carried to the next
    step's cap, one added step for each last step that rejects any (then the rejected alone).

    G=8, steps=2 -> quota 4. Step 0: cap 4 of the 8, scores .95 .2 .93 .1 | the rest lower: the first
    always, .93 passes, .2 and .1 are rejected -> 2 carried. Step 1 (the last): cap 4 + 2 = 6, two pass
    -> 4 rejected, one step added with no quota. Step 2: cap 4, all pass. Row 1 commits its cap whole
    at each step: done in the 2 steps, idle (cap 0) while row 0 runs its added one.
    """
    P, G = 1, 8
    decoder = build_decoder("dream", steps=2, alg="confidence_threshold", threshold=0.9)
    decoder.check(G)
    decoder.start(context(2, P, G))
    masked = torch.zeros(2, P + G, dtype=torch.bool)
    masked[:, P:] = True

    def step(index, scores, expect_cap):
        plan = decoder.plan(index, masked)
        assert plan.window == (P, P + G) and decoder.cap.tolist() == expect_cap
        score = torch.full((2, P + G), float("-inf"), dtype=torch.float64)
        score[:, P:] = torch.tensor(scores, dtype=torch.float64)
        chosen = decoder.select(score.masked_fill(~masked, float("-inf")), plan)
        masked.logical_and_(~chosen)
        return chosen[:, P:].long().tolist()

    assert step(0, [[0.95, 0.2, 0.93, 0.1, 0.05, 0.04, 0.03, 0.02], [0.99] * 4 + [0.5] * 4], [4, 4]) == \
        [[1, 0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert step(1, [[0, 0.5, 0, 0.3, 0.95, 0.2, 0.91, 0.4], [0] * 4 + [0.99] * 4], [6, 4]) == \
        [[0, 0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert step(2, [[0, 0.99, 0, 0.99, 0, 0.99, 0, 0.99], [0] * 8], [4, 0]) == \
        [[0, 1, 0, 1, 0, 1, 0, 1], [0] * 8]
    assert decoder.plan(3, masked) is None and not masked.any()


@pytest.mark.parametrize("params, needle", [
    (dict(block_length=4), "decoding.alg=confidence_threshold with block_length=4"),
    (dict(first_token="commit"), "first_token='commit' applies to blocks"),
    (dict(alg_temp=0.5), "alg_temp=0.5: alg=confidence_threshold takes its positions by confidence"),
    (dict(threshold=0.0), "decoding.threshold=0.0 must be a number in (0, 1]"),
    (dict(threshold=True), "decoding.threshold=True must be a number"),
    (dict(alg="entropy", threshold=0.5), "decoding.threshold=0.5 is used by alg=confidence_threshold only"),
])
def test_dream_confidence_threshold_refuses_what_it_has_no_rule_for(params, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        build_decoder("dream", **{"steps": 4, "alg": "confidence_threshold", **params})


def test_dream_confidence_threshold_quota_must_divide():
    with pytest.raises(ValueError, match=re.escape("gen_length=12 is not divisible by steps=5")):
        build_decoder("dream", steps=5, alg="confidence_threshold").check(12)


# --------------------------------------------------------------------------- confidences

# Logits over a 4-token vocabulary whose last id is [MASK]; softmax denominators by hand:
# row 0: e^2 + e^1 + e^0 + e^1 (the [MASK] logit counts, as in LLaDA's and Dream's code);
# row 1: [MASK] has the largest logit but is never chosen: the token is id 1 (logit 2).
REF_LOGITS = torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.0, 2.0, 1.0, 3.0]])
REF_MASK = 3


def _probs(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def _propose(name, **params):
    decoder = build_decoder(name, steps=1, **params)
    decoder.start(context(2, 1, 1, mask_id=REF_MASK))
    return decoder.propose(REF_LOGITS.clone())


@pytest.mark.parametrize("name", ["low_confidence", "certainty_prior", "threshold"])
def test_llada_confidence_is_the_full_softmax(name):
    tokens, confidence = _propose(name, **({"block_length": 1} if name == "threshold" else {}))
    p0, p1 = _probs([2, 1, 0, 1]), _probs([0, 2, 1, 3])
    assert tokens.tolist() == [0, 1]
    assert confidence.tolist() == pytest.approx([p0[0], p1[1]], rel=1e-12)
    assert confidence[0] < 1 / (1 + math.exp(-1) + math.exp(-2))  # not p / (1 - p_mask)


def test_dream_confidences_are_the_full_softmax():
    p0, p1 = _probs([2, 1, 0, 1]), _probs([0, 2, 1, 3])
    tokens, chosen = _propose("dream", alg="maskgit_plus")
    assert tokens.tolist() == [0, 1]
    assert chosen.tolist() == pytest.approx([p0[0], p1[1]], rel=1e-6)
    _, margin = _propose("dream", alg="topk_margin")  # top-1 minus top-2 of the whole distribution
    assert margin.tolist() == pytest.approx([p0[0] - p0[1], p1[3] - p1[1]], rel=1e-6)
    _, neg_entropy = _propose("dream", alg="entropy")
    expected = [sum(q * math.log(q + 1e-10) for q in p) for p in (p0, p1)]
    assert neg_entropy.tolist() == pytest.approx(expected, rel=1e-6)


def test_dream_top_k_filters_before_the_softmax():
    """top_k=2 keeps the logits >= the 2nd largest: {2, 1, 1} of row 0 (a tie: [MASK]'s 1 stays) and
    {3, 2} of row 1, as Dream's top_k_logits does; the softmax runs over what is kept."""
    _, chosen = _propose("dream", alg="maskgit_plus", top_k=2)
    z0 = math.exp(2) + 2 * math.exp(1)
    z1 = math.exp(3) + math.exp(2)
    assert chosen.tolist() == pytest.approx([math.exp(2) / z0, math.exp(2) / z1], rel=1e-6)


# --------------------------------------------------------------------------- certainty density


def test_density_sum_matches_double_loop():
    gen = torch.Generator().manual_seed(0)
    B, T, sigma = 3, 17, 2.5
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :4] = False
    known = (torch.rand(B, T, generator=gen) < 0.4) & real
    D = certainty_density(known, real, sigma, "sum")
    expected = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if known[b, j]:
                    expected[b, i] += math.exp(-((i - j) ** 2) / (2 * sigma**2))
    torch.testing.assert_close(D.double(), expected, atol=1e-5, rtol=1e-5)


def test_density_fraction_is_a_fraction():
    gen = torch.Generator().manual_seed(1)
    B, T, sigma = 4, 23, 3.0
    real = torch.ones(B, T, dtype=torch.bool)
    real[2, :6] = False
    known = (torch.rand(B, T, generator=gen) < 0.5) & real
    known[3, -1] = True  # the end counts as known in this row
    D = certainty_density(known, real, sigma, "fraction")
    assert D.shape == (B, T)
    assert ((D >= 0) & (D <= 1 + 1e-6)).all()
    assert torch.allclose(certainty_density(real, real, sigma, "fraction")[real], torch.tensor(1.0))
    assert (certainty_density(torch.zeros_like(real), real, sigma, "fraction") == 0).all()

    # Direct reading of the definition: weighted fraction of known among real positions, with
    # ceil(3 sigma) virtual positions past the end, known iff the last position is known.
    tail = math.ceil(3 * sigma)
    for b in range(B):
        for i in range(T):
            num = den = 0.0
            for j in range(T + tail):
                w = math.exp(-((i - j) ** 2) / (2 * sigma**2))
                is_real = bool(real[b, j]) if j < T else True
                is_known = bool(known[b, j]) if j < T else bool(known[b, -1])
                den += w * is_real
                num += w * (is_real and is_known)
            assert float(D[b, i]) == pytest.approx(num / den, abs=1e-5)


def test_density_rejects_unknown_variant():
    real = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="'max'.*sum.*fraction"):
        certainty_density(real, real, 1.0, "max")


# --------------------------------------------------------------------------- generation

BATCHABLE = [
    ("low_confidence", dict(steps=6, block_length=4)),
    ("certainty_prior", dict(steps=6, sigma=3.0)),
    ("certainty_prior", dict(steps=6, sigma=3.0, density="fraction")),
    ("dream", dict(steps=6, alg="maskgit_plus")),
    ("dream", dict(steps=6, alg="entropy")),
    ("dream", dict(steps=6, alg="topk_margin")),
    ("dream", dict(steps=3, alg="confidence_threshold", threshold=0.3)),
]
GEN = 12


def _id(case):
    name, params = case
    extra = params.get("alg") or params.get("density") or ""
    return f"{name}-{extra}".rstrip("-")


@pytest.mark.parametrize("case", BATCHABLE, ids=[_id(c) for c in BATCHABLE])
def test_left_padded_batch_equals_one_by_one(family, weights, case, net_of, make_prompts):
    name, params = case
    net = with_weights(net_of(family), weights)
    prompts = make_prompts([7, 3, 5], seed=11)
    batch = generate(net, prompts, build_decoder(name, **params), build_cache("none"), GEN).tokens
    for row, prompt in enumerate(prompts):
        alone = generate(net, [prompt], build_decoder(name, **params), build_cache("none"), GEN).tokens
        assert batch[row].tolist() == alone[0].tolist(), f"row {row} (prompt length {len(prompt)})"
    assert batch.shape == (3, GEN)


def test_greedy_generation_is_deterministic(family, net_of, make_prompts):
    net = net_of(family)
    prompts = make_prompts([6, 4], seed=12)
    for name, params in BATCHABLE:
        runs = [generate(net, prompts, build_decoder(name, **params), build_cache("none"), GEN).tokens for _ in range(2)]
        assert torch.equal(runs[0], runs[1]), name


SAMPLED = [
    ("low_confidence", dict(steps=6, block_length=4, temperature=1.0)),
    ("random", dict(steps=6, block_length=4)),
    ("dream", dict(steps=6, alg="entropy", temperature=0.8, top_p=0.9)),
    ("dream", dict(steps=6, alg="origin", temperature=1.0, top_k=10)),
    ("certainty_prior", dict(steps=6, sigma=2.0, temperature=0.7)),
]


@pytest.mark.parametrize("case", SAMPLED, ids=[f"{n}-{p.get('alg', '')}".rstrip("-") for n, p in SAMPLED])
def test_seeded_sampling_is_reproducible(case, net_of, make_prompts):
    name, params = case
    net = net_of("dream" if name == "dream" else "llada")
    prompts = make_prompts([6, 4], seed=13)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(net, prompts, build_decoder(name, **params), build_cache("none"), GEN, generator=gen).tokens

    first = run(0)
    assert torch.equal(first, run(0))
    assert any(not torch.equal(first, run(seed)) for seed in (1, 2, 3)), "the seed has no effect"


# Every registered decoder with a few settings, and whether it takes exactly ``steps`` forwards
# (False: a data-dependent count, at most ``steps`` or GEN).
DECODER_CASES = {
    "low_confidence": [(dict(steps=6, block_length=4), True), (dict(steps=3), True)],
    "random": [(dict(steps=6, block_length=4), True), (dict(steps=3), True)],
    "pc_sampler": [(dict(steps=6, block_length=4), True), (dict(steps=3, lambd=1.0), True)],
    "dream": [(dict(steps=6, alg=alg), True) for alg in ("origin", "maskgit_plus", "topk_margin", "entropy")]
    + [(dict(steps=6, alg="entropy", block_length=4), True), (dict(steps=3, alg="confidence_threshold"), False)],
    "certainty_prior": [(dict(steps=6, density=d), True) for d in ("sum", "fraction")],
    "threshold": [(dict(block_length=4), False), (dict(block_length=12, factor=1.0), False)],
    "eb_sampler": [(dict(block_length=4), False), (dict(gamma=0.5), False)],
    "prophet": [(dict(steps=6, block_length=4), False), (dict(steps=12), False)],
    "ar": [(dict(steps=12), True), (dict(steps=12, block_length=4), True)],
    "klass": [(dict(steps=6, block_length=4), False),
              (dict(steps=12, block_length=None, window="block", conf_threshold=0.5, kl_threshold=0.05), False)],
    "wino": [(dict(block_length=4), False), (dict(block_length=12, threshold=0.2, threshold_back=0.95), False)],
    "entropy_threshold": [(dict(block_length=4), False), (dict(block_length=12, threshold=2.0), False)],
    # the block-diffusion decoders (run on block-causal variants of the tiny models)
    "block_diffusion": [(dict(block_length=4, steps=4), False), (dict(block_length=8, steps=2, remasking="static"), False)],
    "fast_dllm_v2": [(dict(block_length=4, sub_block_length=2), False), (dict(block_length=8, threshold=1.0), False)],
}


def all_decoder_cases():
    return [(name, params, exact) for name in decoder_names() for params, exact in DECODER_CASES[name]]


def test_every_decoder_has_cases():
    assert set(DECODER_CASES) == set(decoder_names())


@pytest.mark.parametrize("case", all_decoder_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_position_is_decoded(family, case, net_of, make_prompts):
    name, params, exact_steps = case
    decoder = build_decoder(name, **params)
    net = net_of(family, decoder.block_causal)
    try:
        decoder.check_model(net.args.logit_shift)
    except ValueError:
        pytest.skip(f"decoding={name} refuses the {family} family by name")
    gen = torch.Generator().manual_seed(3)
    out = generate(net, make_prompts([5, 2], seed=14), decoder, build_cache("none"), GEN, generator=gen)
    assert out.tokens.shape == (2, GEN)
    assert not (out.tokens == net.args.mask_token_id).any()
    if exact_steps:
        assert out.nfe == params["steps"]
    elif decoder.block_causal:  # at least one token per step, over whole blocks (steps are per block)
        assert 1 <= out.nfe <= 2 * GEN + 2 * params["block_length"]
    else:  # at least one token per step; Fast-dLLM's Dream threshold rule may add steps past ``steps``
        assert 1 <= out.nfe <= (GEN if params.get("alg") == "confidence_threshold" else params.get("steps", GEN))


@pytest.mark.parametrize("name, params", [("low_confidence", dict(steps=4)), ("dream", dict(steps=4, alg="entropy"))])
def test_mask_token_is_never_committed(family, name, params, make_args, make_net, make_prompts):
    """Even a model whose favourite prediction is [MASK] everywhere fills every position."""
    args = make_args(family)
    net = make_net(args, seed=101)
    with torch.no_grad():  # the mask row follows the mean final hidden state: [MASK] wins (nearly) everywhere
        x = torch.tensor([make_prompts([8], seed=16)[0] + [args.mask_token_id] * 8])
        hidden, _ = net.hidden(x, torch.arange(16)[None], torch.ones(1, 1, 1, 16, dtype=torch.bool))
        net.output.weight[args.mask_token_id] = 20.0 * hidden[0].mean(0) / hidden[0].mean(0).norm()
    prompts = make_prompts([5, 3], seed=15)
    x = torch.tensor([prompts[0] + [args.mask_token_id] * 8])
    assert (net(x).argmax(-1) == args.mask_token_id).float().mean() > 0.5  # the premise
    out = generate(net, prompts, build_decoder(name, **params), build_cache("none"), 8)
    assert not (out.tokens == args.mask_token_id).any()


# --------------------------------------------------------------------------- validation


def run_once(net, decoder, gen_length, prompts=([1, 2, 3],)):
    return generate(net, list(prompts), decoder, build_cache("none"), gen_length)


def test_gen_length_not_divisible_by_block_length(net_of):
    decoder = build_decoder("low_confidence", steps=4, block_length=3)
    with pytest.raises(ValueError, match=r"gen_length=8 .*block_length=3"):
        run_once(net_of("llada"), decoder, 8)


def test_steps_not_divisible_by_blocks(net_of):
    decoder = build_decoder("low_confidence", steps=3, block_length=4)
    with pytest.raises(ValueError, match=r"steps=3 .*number of blocks \(2\)"):
        run_once(net_of("llada"), decoder, 8)


def test_more_steps_than_positions_names_the_block_that_is_set():
    with pytest.raises(ValueError, match=re.escape("steps per block (128) exceed gen_length=64 (one block: block_length null)")):
        build_decoder("dream", steps=128).check(64)
    with pytest.raises(ValueError, match=re.escape("steps per block (16) exceed block_length=8")):
        build_decoder("low_confidence", steps=128, block_length=8).check(64)


@pytest.mark.parametrize("name", ["low_confidence", "random", "certainty_prior", "dream"])
@pytest.mark.parametrize("steps", [0, -2])
def test_steps_below_one(name, steps):
    with pytest.raises(ValueError, match=rf"steps={steps}\b"):
        build_decoder(name, steps=steps)


def test_unknown_decoder_lists_allowed_names():
    with pytest.raises(ValueError, match="'greedy_left_to_right'") as err:
        build_decoder("greedy_left_to_right", steps=4)
    for name in decoder_names():
        assert name in str(err.value)
    assert {"low_confidence", "random", "certainty_prior", "dream"} <= set(decoder_names())


@pytest.mark.parametrize("sigma", [0, -1.5])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match=rf"sigma={sigma}\b"):
        build_decoder("certainty_prior", steps=4, sigma=sigma)


def test_other_bad_values_are_named():
    with pytest.raises(ValueError, match="density='max'"):
        build_decoder("certainty_prior", steps=4, density="max")
    with pytest.raises(ValueError, match="alg='greedy'.*maskgit_plus"):
        build_decoder("dream", steps=4, alg="greedy")
    with pytest.raises(ValueError, match="temperature=-1"):
        build_decoder("low_confidence", steps=4, temperature=-1)
    with pytest.raises(ValueError, match="block_length=0"):
        build_decoder("low_confidence", steps=4, block_length=0)
    with pytest.raises(ValueError, match="no_such_option"):
        build_decoder("low_confidence", steps=4, no_such_option=1)


def test_context_aware_threshold_decays_with_the_masked_fraction():
    """Streaming-dLLM: threshold x (1 - alpha (1 - r)), r = masked fraction of block + window (+ last)."""
    from dllm.decoding.base import DecodeContext

    dec = build_decoder("threshold", block_length=4, threshold=0.9, alpha=0.5, ratio_window=2)
    P, G = 2, 12
    dec.start(DecodeContext(1, P, G, 99, torch.ones(1, P + G, dtype=torch.bool), None, torch.device("cpu")))
    masked = torch.zeros(1, P + G, dtype=torch.bool)
    masked[0, P:] = True
    dec.plan(0, masked)
    assert dec.row_threshold.item() == pytest.approx(0.9)  # a block start: everything masked
    masked[0, P : P + 3] = False  # block [2, 6): 1 of 4 masked; window [6, 8) masked; last position masked
    dec.plan(1, masked)
    r = (1 + 2 + 1) / 7
    assert dec.row_threshold.item() == pytest.approx(0.9 * (1 - 0.5 * (1 - r)))
    score = torch.full((1, P + G), float("-inf"), dtype=torch.float64)
    score[0, 5] = 0.9 * (1 - 0.5 * (1 - r)) + 1e-9
    plan = dec.plan(1, masked)
    assert dec.select(score, plan)[0].nonzero().flatten().tolist() == [5]
    no_window = build_decoder("threshold", block_length=4, threshold=0.9, alpha=0.5)  # r over the rest of the response
    no_window.start(dec.ctx)
    no_window.plan(1, masked)
    assert no_window.row_threshold.item() == pytest.approx(0.9 * (1 - 0.5 * (1 - 9 / 12)))
    # ratio_masked=block (the authors' Dream code with dual_cache): only the block's masked count over the 7
    block_only = build_decoder("threshold", block_length=4, threshold=0.9, alpha=0.5, ratio_window=2, ratio_masked="block")
    block_only.start(dec.ctx)
    block_only.plan(1, masked)
    assert block_only.row_threshold.item() == pytest.approx(0.9 * (1 - 0.5 * (1 - 1 / 7)))


def test_threshold_first_token_commit_takes_the_blocks_first_position_alone():
    """Fast-dLLM's and Streaming-dLLM's Dream code: a block's first step commits its first position
    whatever its confidence; the threshold rule (at least the best one) from the next step on."""
    from dllm.decoding.base import DecodeContext

    dec = build_decoder("threshold", block_length=4, threshold=0.9, first_token="commit")
    P, G = 2, 8
    dec.start(DecodeContext(1, P, G, 99, torch.ones(1, P + G, dtype=torch.bool), None, torch.device("cpu")))
    masked = torch.zeros(1, P + G, dtype=torch.bool)
    masked[0, P:] = True
    score = torch.full((1, P + G), float("-inf"), dtype=torch.float64)
    score[0, P:] = torch.tensor([0.1, 0.95, 0.99, 0.2, 0.97, 0.98, 0.3, 0.3], dtype=torch.float64)
    plan = dec.plan(0, masked)
    assert plan.scheduled[0].nonzero().flatten().tolist() == [P]
    assert dec.select(score, plan)[0].nonzero().flatten().tolist() == [P]  # 0.1, not the confident ones
    masked[0, P] = False
    plan = dec.plan(1, masked)
    in_block = score.masked_fill(~masked, float("-inf"))
    in_block[0, P + 4 :] = float("-inf")  # the loop predicts the window's masked positions only
    assert plan.scheduled is None and dec.select(in_block, plan)[0].nonzero().flatten().tolist() == [3, 4]
    masked[0, P : P + 4] = False
    plan = dec.plan(2, masked)  # the next block's start
    assert plan.window == (P + 4, P + 8) and dec.select(score, plan)[0].nonzero().flatten().tolist() == [P + 4]
    with pytest.raises(ValueError, match=r"decoding.first_token='first' \(allowed: \['schedule', 'commit'\]\)"):
        build_decoder("threshold", first_token="first")
    with pytest.raises(ValueError, match=r"decoding.ratio_masked='all' \(allowed: \['query', 'block'\]\)"):
        build_decoder("threshold", ratio_masked="all")


@pytest.mark.parametrize("params, needle", [
    (dict(alpha=1.5), "decoding.alpha=1.5 must be a number in [0, 1]"),
    (dict(ratio_window=-1), "decoding.ratio_window=-1 must be an integer >= 0"),
    (dict(alpha=0.3, factor=1.0), "applies to the threshold rule"),
    (dict(steps=0), "decoding.steps=0 must be an integer >= 1 or null"),
])
def test_context_aware_threshold_refuses_bad_settings(params, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_decoder("threshold", **params)
