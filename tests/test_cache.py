"""Cache methods: exactness at refresh 1, hand-traced active sets, d²Cache internals, bad input.

Everything runs on CPU in a few seconds with small random models built here (GQA: 4 query
heads, 2 key/value heads) for both families (LLaDA: logit_shift 0, Dream: logit_shift 1).
"""
from __future__ import annotations

import math

import pytest
import torch

from dllm.cache.base import ActiveRequest, CacheMethod, StepView, build_cache, cache_names
from dllm.cache.d2cache import nucleus, rollout_importance
from dllm.cache.dkv_greedy import window_neighbours
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate
from dllm.models.transformer import ModelArgs, Transformer

from conftest import WEIGHTS, Recorder, with_weights

VOCAB, MASK, PAD, EOS = 64, 63, 0, 1
FAMILIES = ("llada", "dream")
PROMPT_1 = [[5, 9, 14, 3, 22, 7, 31, 12, 40, 8]]  # batch 1, 10 tokens
PROMPTS_3 = [[5, 9, 14, 3, 22, 7, 31], [17, 4, 29, 11], [2, 6, 10, 44, 13, 27, 35, 19, 50, 23]]  # left-padded to 10


# ---------------------------------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(family: str, seed: int = 0, n_layers: int = 2) -> Transformer:
    args = ModelArgs(
        family=family, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB,
        rope_theta=10000.0, norm_eps=1e-5, qkv_bias=family == "dream", tie_embeddings=False, max_seq_len=128,
        mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, logit_shift=1 if family == "dream" else 0,
    )
    torch.manual_seed(seed)
    net = Transformer(args).eval()
    with torch.no_grad():
        # Small embeddings: attention (position-dependent through RoPE) dominates the residual, so
        # masked positions do not all predict the same token.
        net.tok_embeddings.weight.mul_(0.05)
        # The mask token's logit is 0, below the max of 63 random logits: never predicted, so every
        # "transfer" really unmasks a position (as with real checkpoints).
        net.output.weight[MASK] = 0
    return net


@pytest.fixture(scope="module", params=[(f, w) for f in FAMILIES for w in WEIGHTS], ids="-".join)
def net(request) -> Transformer:
    family, weights = request.param
    return with_weights(make_net(family), weights)


def decoder_for(name: str, steps: int = 16, block_length: int | None = 8, **kw):
    if name in ("certainty_prior", "dream"):
        return build_decoder(name, steps=steps, **kw)
    return build_decoder(name, steps=steps, block_length=block_length, **kw)


def seeded(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted_left(mask: torch.Tensor, shift: int) -> torch.Tensor:
    """Position j -> j - shift (the row that computes position j's prediction)."""
    if shift == 0:
        return mask
    out = torch.zeros_like(mask)
    out[:, :-shift] = mask[:, shift:]
    return out


def shifted_right(mask: torch.Tensor, shift: int) -> torch.Tensor:
    """Computing row j -> predicted position j + shift."""
    out = torch.zeros_like(mask)
    out[:, shift:] = mask[:, :-shift]
    return out


def real_mask(prompts, gen_length: int) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    real = torch.ones(len(prompts), width + gen_length, dtype=torch.bool)
    for row, p in enumerate(prompts):
        real[row, : width - len(p)] = False
    return real


# ------------------------------------------------------------------ refresh 1 reproduces cache=none

# (cache, cache params, decoding, decoding params); every method with refresh_interval=1.
EXACT = [
    ("dkv_decode", dict(refresh_interval=1, variant="decode"), "low_confidence", {}),
    ("dkv_greedy", dict(refresh_interval=1, window=4), "random", {}),
    ("d2cache", dict(refresh_interval=1, k=4, p=0.1, sigma=10.0), "certainty_prior", dict(sigma=10.0)),
]


@pytest.mark.parametrize("prompts", [PROMPT_1, PROMPTS_3], ids=["batch1", "batch3_padded"])
@pytest.mark.parametrize("method,params,decoding,dparams", EXACT, ids=[e[0] for e in EXACT])
def test_refresh_one_matches_none(net, prompts, method, params, decoding, dparams):
    ref = generate(net, prompts, decoder_for(decoding, **dparams), build_cache("none"), 16, generator=seeded())
    out = generate(net, prompts, decoder_for(decoding, **dparams), build_cache(method, **params), 16, generator=seeded())
    assert torch.equal(out.tokens, ref.tokens)
    assert not (out.tokens == MASK).any()
    assert out.recompute_ratio == pytest.approx(1.0)


class AllRealRows(CacheMethod):
    """Recomputes every real position through the *partial* (packed, ragged) path, never `full`."""

    name = "all_real_rows"

    def select(self, view: StepView) -> ActiveRequest:
        everything = torch.ones_like(view.masked)
        return ActiveRequest(predict=everything, refresh=everything)


@pytest.mark.parametrize("prompts", [PROMPT_1, PROMPTS_3], ids=["batch1", "batch3_padded"])
def test_partial_path_with_all_rows_matches_none(net, prompts):
    """The packed path (ragged rows, trash slot, scattered K/V writes) computes what the full path does."""
    ref = generate(net, prompts, decoder_for("low_confidence"), build_cache("none"), 16)
    out = generate(net, prompts, decoder_for("low_confidence"), AllRealRows(), 16, record_trace=True)
    assert torch.equal(out.tokens, ref.tokens)
    real = real_mask(prompts, 16)
    assert all(torch.equal(active, real) for active in out.trace)


PAPERISH = [
    ("dkv_decode", dict(refresh_interval=4), "low_confidence", {}),
    ("dkv_decode", dict(refresh_interval=4, variant="prefill"), "low_confidence", {}),
    ("dkv_decode", dict(refresh_interval=4, variant="pd"), "low_confidence", {}),
    ("dkv_greedy", dict(refresh_interval=2, window=2), "random", {}),
    ("d2cache", dict(k=2, p=0.1, sigma=10.0), "certainty_prior", dict(sigma=10.0)),
]


@pytest.mark.parametrize("method,params,decoding,dparams", PAPERISH,
                         ids=[f"{e[0]}-{e[1].get('variant', '')}" for e in PAPERISH])
def test_cached_generation_completes_with_less_compute(net, method, params, decoding, dparams):
    out = generate(net, PROMPTS_3, decoder_for(decoding, **dparams), build_cache(method, **params), 16,
                   generator=seeded())
    assert out.tokens.shape == (3, 16)
    assert not (out.tokens == MASK).any()
    assert out.nfe == 16
    assert out.recompute_ratio < 1 and out.ideal_speedup > 1


# ------------------------------------------------------------------------ dKV-Cache-Decode, by hand

def test_dkv_decode_hand_traced_active_counts():
    # prompt 10 + gen 16 = T 26; block 8, steps 16 -> 8 steps per block, exactly 1 token per step.
    # Full forwards (26 rows): block steps 0 and 1, and block_step % 4 == 0 -> global steps
    # 0, 1, 4 (block 0) and 8, 9, 12 (block 1).
    # Other steps s: still-masked positions in *all* blocks before step s = 16 - s, plus the one
    # position decoded at step s-1 -> 17 - s:
    #   s=2: 15, s=3: 14, s=5: 12, s=6: 11, s=7: 10, s=10: 7, s=11: 6, s=13: 4, s=14: 3, s=15: 2.
    expected = [26, 26, 15, 14, 26, 12, 11, 10, 26, 26, 7, 6, 26, 4, 3, 2]
    net = make_net("llada")  # GQA: n_kv_heads=2 < n_heads=4 (the original dKV-Cache crashes here)
    rec = Recorder(build_cache("dkv_decode", refresh_interval=4))
    out = generate(net, PROMPT_1, decoder_for("low_confidence", steps=16, block_length=8), rec, 16,
                   record_trace=True)
    assert [int(a.sum()) for a in out.trace] == expected
    assert [int(s["transferred"].sum()) for s in rec.steps] == [1] * 16
    assert out.active_token_layers == sum(expected) * net.args.n_layers
    assert out.token_layers_per_forward == [n * net.args.n_layers for n in expected] and out.nfe == 16
    # And the sets, not only the counts: masked (all blocks) + decoded last step.
    for s in range(2, 16):
        if s in (4, 8, 9, 12):
            continue
        assert torch.equal(out.trace[s], rec.steps[s]["masked"] | rec.steps[s - 1]["transferred"])
    assert not (out.tokens == MASK).any()


def test_dkv_decode_dream_active_set_goes_through_the_shift():
    net = make_net("dream")
    rec = Recorder(build_cache("dkv_decode", refresh_interval=4))
    out = generate(net, PROMPTS_3, decoder_for("low_confidence"), rec, 16, record_trace=True)
    real = real_mask(PROMPTS_3, 16)
    for s, step in enumerate(rec.steps):
        if step["full"]:
            assert step["plan"].block_step < 2 or step["plan"].block_step % 4 == 0
            continue
        masked = step["masked"]
        expected = (masked | shifted_left(masked, 1) | rec.steps[s - 1]["transferred"]) & real
        assert torch.equal(out.trace[s], expected)
    assert not (out.tokens == MASK).any()


# ------------------------------------------------------------------------ dKV-Cache-Greedy, by hand

def reference_neighbours(scheduled, masked, window: int, lo: int) -> torch.Tensor:
    """Plain-Python reading of the spec: for each scheduled i, look at i-1, i+1, i-2, i+2, ... up to
    distance ``window`` and take still-masked positions in [lo, T) until ``window`` are taken."""
    B, T = scheduled.shape
    chosen = torch.zeros_like(scheduled)
    for b in range(B):
        for i in scheduled[b].nonzero().flatten().tolist():
            taken = 0
            for d in range(1, window + 1):
                for j in (i - d, i + d):
                    if lo <= j < T and masked[b, j] and taken < window:
                        chosen[b, j] = True
                        taken += 1
    return chosen


def _mask(T: int, rows: list[list[int]]) -> torch.Tensor:
    m = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, idx in enumerate(rows):
        m[b, idx] = True
    return m


def test_window_neighbours_hand_case():
    T, lo = 12, 2
    scheduled = _mask(T, [[3, 9], [2]])
    # row 1 marks position 1 (< lo, outside the response) masked on purpose: it must not be taken.
    masked = _mask(T, [[2, 3, 4, 5, 8, 9, 11], [1, 2, 3, 4, 5]])
    # w=2: 3 -> 2 (d=1 left), 4 (d=1 right); 9 -> 8 (d=1 left), 10 known, 7 known, 11 (d=2 right).
    #      row 1: 2 -> 1 is before lo, 3 (d=1 right), 0 before lo, 4 (d=2 right).
    assert torch.equal(window_neighbours(scheduled, masked, 2, lo), _mask(T, [[2, 4, 8, 11], [3, 4]]))
    # w=1: only the first masked neighbour at distance 1 (left first).
    assert torch.equal(window_neighbours(scheduled, masked, 1, lo), _mask(T, [[2, 8], [3]]))
    # w=0: nothing.
    assert not window_neighbours(scheduled, masked, 0, lo).any()
    # w=4: 3 -> 2, 4, 5 (1 and 0 before lo, 6, 7 known); 9 -> 8, 11, 5 (d=4 left).
    assert torch.equal(window_neighbours(scheduled, masked, 4, lo), _mask(T, [[2, 4, 5, 8, 11], [3, 4, 5]]))


@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_neighbours_matches_reference_on_random_masks(window):
    g = torch.Generator().manual_seed(window)
    for _ in range(20):
        masked = torch.rand(3, 30, generator=g) < 0.6
        masked[:, :5] = False
        scheduled = masked & (torch.rand(3, 30, generator=g) < 0.2)
        got = window_neighbours(scheduled, masked, window, 5)
        assert torch.equal(got, reference_neighbours(scheduled, masked, window, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_dkv_greedy_traced_steps(family):
    net = make_net(family)
    window = 2
    rec = Recorder(build_cache("dkv_greedy", refresh_interval=2, window=window))
    # 2 tokens per step so that a step has several scheduled positions.
    out = generate(net, PROMPTS_3, decoder_for("random", steps=8, block_length=8), rec, 16,
                   generator=seeded(), record_trace=True)
    real = real_mask(PROMPTS_3, 16)
    P = real.shape[1] - 16
    partial = 0
    for s, step in enumerate(rec.steps):
        scheduled = step["scheduled"]
        # The random order is fixed up front: what is scheduled is what gets unmasked.
        assert torch.equal(step["transferred"], scheduled)
        if step["full"]:
            assert step["plan"].block_step % 2 == 0
            continue
        partial += 1
        neighbours = reference_neighbours(scheduled, step["masked"], window, P)
        expected = rec.steps[s - 1]["transferred"] | neighbours | shifted_left(scheduled, net.args.logit_shift)
        # LLaDA: decoded last step | scheduled | neighbours, literally; Dream: scheduled through the shift.
        assert torch.equal(out.trace[s], expected & real)
        assert out.trace[s].sum() < real.sum()
    assert partial == 4
    assert not (out.tokens == MASK).any()


# ------------------------------------------------------------------------------------- d²Cache

def dense_rollout(attention, rows, rows_valid, start) -> torch.Tensor:
    """The definition, literally: W_l = row-normalised (E_l + I) as T x T matrices, C = W_L ... W_1,
    c_j = sum over real rows i of C_ij."""
    B, T = start.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        C = torch.eye(T, dtype=torch.float64)
        for attn in attention:  # layer 1 first: C <- W_l C
            E = torch.eye(T, dtype=torch.float64)
            for a in range(rows.shape[1]):
                if rows_valid[b, a]:
                    E[rows[b, a]] = attn[b, a, :T].double()
            W = E + torch.eye(T, dtype=torch.float64)
            W = W / W.sum(1, keepdim=True)
            C = W @ C
        out[b] = start[b].double() @ C
    return out


def random_attention(L, rows, real, g):
    """Per layer (B, A, T+1) head-averaged attention rows: softmax over real keys, trash slot 0."""
    B, A = rows.shape
    T = real.shape[1]
    key_ok = torch.cat([real, torch.zeros(B, 1, dtype=torch.bool)], 1)[:, None, :]
    return [torch.randn(B, A, T + 1, generator=g).mul(3).masked_fill(~key_ok, float("-inf")).softmax(-1)
            for _ in range(L)]


@pytest.mark.parametrize("ragged", [False, True])
def test_rollout_importance_equals_dense_definition(ragged):
    g = torch.Generator().manual_seed(7)
    B, T, L = 3, 20, 4
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :3] = False  # left padding
    real[2, :6] = False
    if ragged:
        counts = [5, 9, 2]
        A = max(counts)
        rows = torch.full((B, A), T, dtype=torch.long)  # padding entries hold index T
        valid = torch.zeros(B, A, dtype=torch.bool)
        for b, n in enumerate(counts):
            candidates = real[b].nonzero().flatten()
            pick = candidates[torch.randperm(len(candidates), generator=g)[:n]]
            rows[b, :n] = pick
            valid[b, :n] = True
    else:  # a full forward: every position, padding included, is a row
        rows = torch.arange(T).expand(B, T).clone()
        valid = torch.ones(B, T, dtype=torch.bool)
    attention = random_attention(L, rows, real, g)
    got = rollout_importance(attention, rows, valid, real)
    want = dense_rollout(attention, rows, valid, real)
    assert got.shape == (B, T)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # The rollout keeps the mass of the start vector (W_l are row-stochastic) and never puts any
    # on padding.
    torch.testing.assert_close(got.sum(1).double(), real.sum(1).double(), rtol=1e-5, atol=1e-5)
    assert (got[~real] == 0).all()


def test_nucleus_smallest_set_reaching_p():
    importance = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])
    every = torch.ones(1, 5, dtype=torch.bool)

    def picked(p, candidates=every, imp=importance):
        return nucleus(imp, candidates, p)[0].nonzero().flatten().tolist()

    assert picked(0.5) == [0]  # 0.5 reaches 0.5 exactly
    assert picked(0.6) == [0, 1]  # 0.5 < 0.6 <= 0.8
    assert picked(0.8) == [0, 1]
    assert picked(0.81) == [0, 1, 2]
    assert picked(0.96) == [0, 1, 2, 3]  # the zero-importance position is never needed
    assert picked(1.0) == [0, 1, 2, 3]
    assert picked(1e-6) == [0]  # at least one
    # Renormalised over the candidates: without position 0 the mass is [.6, .3, .1, 0] / 1.
    no_first = torch.tensor([[False, True, True, True, True]])
    assert picked(0.6, no_first) == [1]
    assert picked(0.61, no_first) == [1, 2]
    # Rows are independent; a row with no candidates selects nothing.
    two = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    cands = torch.tensor([[True] * 5, [False] * 5])
    assert nucleus(two, cands, 0.6).tolist() == [[True, True, False, False, False], [False] * 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_d2cache_stage1_confidence_cache_is_refreshed(family):
    net = make_net(family)
    k = 3
    rec = Recorder(build_cache("d2cache", k=k, p=0.1, sigma=10.0))
    generate(net, PROMPTS_3, decoder_for("certainty_prior", sigma=10.0), rec, 16, record_trace=True)
    real = real_mask(PROMPTS_3, 16)
    shift = net.args.logit_shift
    T = real.shape[1]
    kernel = torch.exp(-((torch.arange(T)[:, None] - torch.arange(T)[None, :]).double() ** 2) / (2 * 10.0**2))
    changed = 0
    for step, following in zip(rec.steps[1:-1], rec.steps[2:]):
        assert not step["full"]
        fresh = ~step["confidence"].isnan()
        # Fresh confidences exist exactly for masked positions whose predicting row was computed.
        predicted = step["active"] if shift == 0 else shifted_right(step["active"], shift)
        assert torch.equal(fresh, step["masked"] & predicted)
        after, before = step["cache_conf_after"], step["cache_conf_before"]
        assert torch.equal(after[fresh], step["confidence"][fresh])  # every recomputed one updated
        assert torch.equal(after[~fresh], before[~fresh])  # the others kept
        changed += int((after[fresh] != before[fresh]).sum())
        # S1 of the following step: top-k still-masked positions by cached confidence x density (sum).
        still = step["masked"] & ~step["transferred"]
        if still.any():
            known = real & ~still
            score = (after * (known.double() @ kernel)).masked_fill(~still, -math.inf)
            nxt = following["request"].predict
            for b in range(3):
                n = min(k, int(still[b].sum()))
                top = set(score[b].topk(n).indices.tolist())
                assert set(nxt[b].nonzero().flatten().tolist()) == top
    assert changed > 0  # the cache is really refreshed after non-full steps (not frozen at step 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_d2cache_never_unmasks_positions_not_recomputed(family):
    net = make_net(family)
    rec = Recorder(build_cache("d2cache", k=2, p=0.1, sigma=10.0))
    out = generate(net, PROMPTS_3, decoder_for("certainty_prior", sigma=10.0), rec, 16, record_trace=True)
    real = real_mask(PROMPTS_3, 16)
    shift = net.args.logit_shift
    selective = 0
    for s, step in enumerate(rec.steps):
        transferred, active = step["transferred"], out.trace[s]
        assert torch.equal(active, step["active"])
        assert not (transferred & ~step["masked"]).any()
        predicted = active if shift == 0 else shifted_right(active, shift)
        assert not (transferred & ~predicted).any(), f"step {s}: unmasked a position whose logits are stale"
        # Meaningful only when some masked positions were *not* recomputed.
        selective += int((step["masked"] & ~predicted).any())
        if s > 0:
            assert active.sum() < real.sum()
    assert selective > 0
    assert not (out.tokens == MASK).any()
    assert out.ideal_speedup > 1.5


# ------------------------------------------------------------------------------ bad hyperparameters

@pytest.mark.parametrize("name,params,needle", [
    ("d2cache", dict(k=0), "cache.k=0"),
    ("d2cache", dict(p=0), "cache.p=0"),
    ("d2cache", dict(p=1.5), "cache.p=1.5"),
    ("d2cache", dict(sigma=0), "cache.sigma=0"),
    ("d2cache", dict(refresh_interval=0), "cache.refresh_interval=0"),
    ("d2cache", dict(density="gauss"), "'gauss'"),
    ("dkv_decode", dict(refresh_interval=0), "cache.refresh_interval=0"),
    ("dkv_decode", dict(variant="both"), "'both'"),
    ("dkv_greedy", dict(refresh_interval=0), "cache.refresh_interval=0"),
    ("dkv_greedy", dict(window=-1), "cache.window=-1"),
    ("dkv_decode", dict(refresh=8), "refresh"),  # unknown parameter -> ValueError, not TypeError
])
def test_bad_hyperparameters(name, params, needle):
    with pytest.raises(ValueError) as err:
        build_cache(name, **params)
    assert needle in str(err.value)


def test_unknown_cache_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        build_cache("dual_cache")
    message = str(err.value)
    assert "'dual_cache'" in message
    for name in ("none", "dkv_decode", "dkv_greedy", "d2cache"):
        assert name in message
    assert set(cache_names()) >= {"none", "dkv_decode", "dkv_greedy", "d2cache"}


def test_dkv_greedy_rejects_confidence_decoding():
    net = make_net("llada")
    with pytest.raises(ValueError) as err:
        generate(net, PROMPT_1, decoder_for("low_confidence"), build_cache("dkv_greedy"), 16)
    assert "low_confidence" in str(err.value) and "random" in str(err.value)


# ------------------------------------------------------------------------- fixes found by review

def test_d2cache_small_k_still_unmasks_every_planned_token(net):
    """k below the per-step count: stage 1 widens to the count, so no mask is left behind."""
    decoder = build_decoder("certainty_prior", steps=4, sigma=4.0)
    out = generate(net, PROMPT_1, decoder, build_cache("d2cache", k=2, sigma=4.0), 16)
    assert not (out.tokens == MASK).any()


def test_nucleus_picks_a_candidate_even_when_all_weigh_zero():
    candidates = torch.tensor([[False, True, False, True]])
    chosen = nucleus(torch.zeros(1, 4), candidates, 0.1)
    assert chosen.sum() == 1 and (chosen & candidates).sum() == 1


def test_d2cache_rejects_decoders_without_probability_confidence():
    with pytest.raises(ValueError, match="'dream'/entropy"):
        build_cache("d2cache").check(build_decoder("dream", steps=16, alg="entropy"))
    build_cache("d2cache").check(build_decoder("dream", steps=16, alg="maskgit_plus"))
