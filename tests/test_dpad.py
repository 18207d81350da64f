"""cache=dpad: DPad's suffix dropout (per-block Gaussian distance decay inside a sliding window),
alone or on Fast-dLLM's prefix/dual caches, through the key-set protocol."""
from __future__ import annotations

import math

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.cache.dpad import retention
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import generate

from conftest import MASK_ID, Recorder, random_prompts, tiny_args, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

GEN, BLOCK = 16, 4
PHI0 = 1 / math.sqrt(2 * math.pi)  # the standard normal density at 0


def net_of(family: str):
    return tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))


def decoder(name: str):
    if name == "low_confidence":
        return build_decoder("low_confidence", steps=GEN, block_length=BLOCK)
    return build_decoder("threshold", block_length=BLOCK, threshold=0.3)


def run(net, prompts, cache, decoding="low_confidence", seed=0, **kw):
    return generate(net, prompts, decoder(decoding), cache, GEN, torch.Generator().manual_seed(seed), **kw)


# --- the retention probabilities and the draw ------------------------------------------------

def test_retention_hand_values():
    """window 8, k_sigma 4, scale 2: reference spacing x_i = 4 i / 7, paper spacing x_i = 4 (i + 1) / 8."""
    ref = retention(10, 8, 4.0, 2.0, "reference")
    assert ref[0].item() == pytest.approx(2 * PHI0)  # 0.797885: the first suffix position at the peak
    assert ref[1].item() == pytest.approx(2 * PHI0 * math.exp(-0.5 * (4 / 7) ** 2))  # 0.677705
    assert ref[7].item() == pytest.approx(2 * PHI0 * math.exp(-8.0))  # the window's last one at 4 sigma
    assert ref[8:].tolist() == [0.0, 0.0]  # outside the window: always dropped
    paper = retention(10, 8, 4.0, 2.0, "paper")
    assert paper[0].item() == pytest.approx(2 * PHI0 * math.exp(-0.5 * 0.5**2))  # 0.704130: d = 1 at 0.5 sigma
    assert paper[7].item() == pytest.approx(ref[7].item())
    assert paper[8:].tolist() == [0.0, 0.0]
    assert retention(3, 1, 4.0, 2.0, "reference").tolist() == pytest.approx([2 * PHI0, 0.0, 0.0])
    assert (ref[:8].diff() < 0).all()  # decays with distance


def kept_sets(cache, prompts, family="llada", decoding="low_confidence", seed=0):
    """Per step, the kept suffix offsets (relative to the block's end) the method used."""
    rec = Recorder(cache)
    out = run(net_of(family), prompts, rec, decoding, seed)
    P = max(len(p) for p in prompts)
    sets = []
    for step in rec.steps:
        hi = step["plan"].commit_window[1]
        keys = step["request"].keys
        kept = torch.ones(P + GEN, dtype=torch.bool) if keys is None else keys[0]
        sets.append((hi, (kept[hi:].nonzero().flatten()).tolist()))
    return sets, rec, out


def test_kept_suffix_hand_traced():
    """Prompt 3, gen 16, blocks of 4, window 8, k_sigma 4, scale 2 (reference spacing), seed 4.

    p by offset = .7979 .6777 .4153 .1836 .0585 .0135 .0022 .0003, then 0 (outside the window).
    The generator's float64 uniforms, one per suffix position at each block start:
      block 0 (end 7, 12 positions): u = .4771 .7317 .0576 .9432 .9486 .5513 .4101 .7596 .1079 ...
        -> kept 0, 2 (u1 = .7317 > p1 = .6777; from offset 8 on p = 0)
      block 1 (end 11, 8): u = .4101 .0046 .5489 .3399 .4035 .6980 .4398 .2253 -> kept 0, 1
      block 2 (end 15, 4): u = .2283 .5055 .3547 .1605 -> kept 0, 1, 2, 3 (u3 = .1605 < p3 = .1836)
      block 3 (end 19): no suffix.
    """
    cache = build_cache("dpad", window=8, k_sigma=4.0, scale=2.0)
    sets, _, _ = kept_sets(cache, random_prompts((3,)), seed=4)
    by_block = dict(sets)
    assert by_block == {7: [0, 2], 11: [0, 1], 15: [0, 1, 2, 3], 19: []}
    # one draw per block: every step of a block uses the same set
    assert all(kept == by_block[hi] for hi, kept in sets)


def test_hand_values_match_generator():
    """The uniforms of the hand trace above are the generator's (guards the docstring)."""
    gen = torch.Generator().manual_seed(4)
    u = [torch.rand(n, dtype=torch.float64, generator=gen) for n in (12, 8, 4)]
    assert [round(v, 4) for v in u[0][:9].tolist()] == [.4771, .7317, .0576, .9432, .9486, .5513, .4101, .7596, .1079]
    assert [round(v, 4) for v in u[1].tolist()] == [.4101, .0046, .5489, .3399, .4035, .6980, .4398, .2253]
    assert [round(v, 4) for v in u[2].tolist()] == [.2283, .5055, .3547, .1605]
    assert [round(v, 4) for v in retention(8, 8, 4.0, 2.0, "reference").tolist()] == [
        .7979, .6777, .4153, .1836, .0585, .0135, .0022, .0003]


def test_window_only_and_uniform():
    """dropout=none keeps exactly the window; a scale that lifts p >= 1 over the window does the same;
    dropout=uniform keeps `keep` positions of the window."""
    prompts = random_prompts((3,))
    for cache in (build_cache("dpad", dropout="none", window=5), build_cache("dpad", window=5, scale=1e5)):
        sets, _, _ = kept_sets(cache, prompts)
        assert dict(sets) == {7: [0, 1, 2, 3, 4], 11: [0, 1, 2, 3, 4], 15: [0, 1, 2, 3], 19: []}
    sets, _, _ = kept_sets(build_cache("dpad", dropout="uniform", window=6, keep=2), prompts)
    by_block = dict(sets)
    assert [len(by_block[hi]) for hi in (7, 11, 15, 19)] == [2, 2, 2, 0]
    assert all(max(by_block[hi]) < 6 for hi in (7, 11, 15))


def test_retention_frequencies():
    """Over many blocks, each offset is kept with its retention probability (the distance decay)."""
    cache = build_cache("dpad", window=6, k_sigma=3.0, scale=2.2)
    real = torch.ones(1, GEN, dtype=torch.bool)
    cache.start(DecodeContext(1, 0, GEN, MASK_ID, real, torch.Generator().manual_seed(1), torch.device("cpu")))
    draws = torch.stack([cache.draw_suffix(8) for _ in range(4000)]).double().mean(0)
    assert draws.tolist() == pytest.approx(retention(8, 6, 3.0, 2.2, "reference").tolist(), abs=0.03)


def test_float32_draws_are_the_authors_sampler():
    """draw=float32: per block, torch.rand(n) in float32 from the run's generator against float32 keep
    probabilities, the authors' GaussianSampler (a generator seeded as their global one draws the same
    uniforms, so the same positions are kept; checked token for token against their code on a tiny
    LLaDA). The probabilities are the reference distance's, to float32 rounding; the draws are not
    the float64 path's."""
    from dllm.cache.dpad import retention_float32

    for n, window in ((10, 8), (8, 8), (5, 8)):
        assert retention_float32(n, window, 4.0, 2.0).dtype == torch.float32
        assert retention_float32(n, window, 4.0, 2.0).tolist() == pytest.approx(
            retention(n, window, 4.0, 2.0, "reference").tolist(), rel=1e-6)
    real = torch.ones(1, GEN, dtype=torch.bool)
    kept = {}
    for draw in ("float32", "float64"):
        cache = build_cache("dpad", window=12, k_sigma=2.0, scale=2.0, draw=draw)
        cache.start(DecodeContext(1, 0, GEN, MASK_ID, real, torch.Generator().manual_seed(3), torch.device("cpu")))
        kept[draw] = torch.stack([cache.draw_suffix(16) for _ in range(20)])
    uniforms = torch.rand(20, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(kept["float32"], uniforms < retention_float32(16, 12, 2.0, 2.0))
    assert not torch.equal(kept["float32"], kept["float64"])


# --- the requests in the loop ------------------------------------------------------------------

@pytest.mark.parametrize("base", ["none", "prefix", "dual"])
def test_rows_and_keys(family, base):
    """Keys = everything up to the block's end + the kept suffix; rows = the base's rows among them."""
    prompts = random_prompts((6, 4))
    sets, rec, out = kept_sets(build_cache("dpad", window=6, base=base), prompts, family)
    T = 6 + GEN
    dropped_somewhere = False
    for step, ((hi, kept), r) in enumerate(zip(sets, rec.steps)):
        lo = hi - BLOCK
        keys = torch.zeros(T, dtype=torch.bool)
        keys[:hi] = True
        keys[torch.tensor(kept, dtype=torch.long) + hi] = True
        request = r["request"]
        if keys.all():  # nothing dropped: the base's own request
            assert request.keys is None
            continue
        dropped_somewhere = True
        assert torch.equal(request.keys, keys.expand(2, T))
        active = r["active"]
        assert not (active & ~keys).any()  # no dropped position is computed
        if base == "none" or step % BLOCK == 0:  # every kept real position
            expected = keys.expand(2, T).clone()
            expected[1, :2] = False  # left padding of the short row
        else:
            expected = torch.zeros(2, T, dtype=torch.bool)
            expected[:, lo : (T if base == "prefix" else hi)] = True
            expected &= keys
            if family == "dream":  # the block's first position is predicted from lo - 1 while masked
                expected[:, lo - 1] = r["masked"][:, lo]
        assert torch.equal(active, expected), f"step {step}"
    assert dropped_somewhere
    assert out.recompute_ratio < 1.0


# --- dropout off = the base, token for token ----------------------------------------------------

@pytest.mark.parametrize("decoding", ["low_confidence", "threshold"])
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_dropout_off_reproduces_base(family, decoding, lengths):
    net, prompts = net_of(family), random_prompts(lengths)
    for base in ("none", "prefix", "dual"):
        reference = run(net, prompts, build_cache(base), decoding)
        for params in (dict(dropout="none", window=None), dict(window=GEN, scale=1e6)):
            out = run(net, prompts, build_cache("dpad", base=base, **params), decoding)
            assert torch.equal(out.tokens, reference.tokens), (base, params)
            assert out.token_layers_per_forward == reference.token_layers_per_forward


# --- against a re-statement of the authors' loop: dropped positions removed from the sequence -----

def removed_suffix_reference(net, prompts, seed: int, window: int, k_sigma: float, scale: float):
    """The authors' ``generate`` (no cache, one token per step, blocks): per block, draw the kept suffix,
    run every step on the gathered sequence [:block_end] + kept suffix (original RoPE positions), and
    commit the most confident masked position of the block (argmax excluding [MASK], float64 softmax)."""
    args = net.args
    B, P = len(prompts), max(len(p) for p in prompts)
    T = P + GEN
    x = torch.full((B, T), MASK_ID, dtype=torch.long)
    real = torch.ones(B, T, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        x[row, : P - len(prompt)] = args.pad_token_id
        x[row, P - len(prompt) : P] = torch.tensor(prompt)
        real[row, : P - len(prompt)] = False
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(seed)
    shift = args.logit_shift
    for hi in range(P + BLOCK, T + 1, BLOCK):
        u = torch.rand(T - hi, dtype=torch.float64, generator=gen)
        kept = u < retention(T - hi, window, k_sigma, scale, "reference")
        cols = torch.cat([torch.arange(hi), hi + kept.nonzero().flatten()])  # the pruned sequence
        for _ in range(BLOCK):
            hidden, _ = net.hidden(x[:, cols], positions[:, cols], real[:, cols][:, None, None, :])
            logits = net.output(hidden)[:, hi - BLOCK - shift : hi - shift].double()  # predicting the block
            probs = torch.softmax(logits, -1)  # over the whole vocabulary, [MASK] included
            tokens = logits.index_fill(-1, torch.tensor([MASK_ID]), float("-inf")).argmax(-1)
            conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
            conf = conf.masked_fill(x[:, hi - BLOCK : hi] != MASK_ID, float("-inf"))
            best = conf.argmax(1)
            for row in range(B):
                x[row, hi - BLOCK + best[row]] = tokens[row, best[row]]
    return x[:, P:]


@pytest.mark.parametrize("lengths", [(7,), (7, 3)])
def test_matches_removed_suffix_reference(family, lengths):
    net, prompts = net_of(family), random_prompts(lengths)
    out = run(net, prompts, build_cache("dpad", window=6, k_sigma=3.0, scale=2.0), seed=3)
    expected = removed_suffix_reference(net, prompts, seed=3, window=6, k_sigma=3.0, scale=2.0)
    assert torch.equal(out.tokens, expected)
    full = run(net, prompts, build_cache("none"))
    assert not torch.equal(full.tokens, expected)  # the dropout changes the answer here


# --- the invariant: no [MASK] left ----------------------------------------------------------------

@pytest.mark.parametrize("decoding", ["low_confidence", "threshold", "dream"])
@pytest.mark.parametrize("base", ["none", "prefix", "dual"])
def test_never_ends_with_mask(family, decoding, base):
    net, prompts = net_of(family), random_prompts((7, 3, 10))
    for params in (dict(window=2, scale=1.0), dict(dropout="uniform", window=8, keep=0), dict(distance="paper", window=5)):
        dec = (build_decoder("dream", steps=GEN, alg="entropy", block_length=BLOCK) if decoding == "dream"
               else decoder(decoding))
        out = generate(net, prompts, dec, build_cache("dpad", base=base, **params), GEN, torch.Generator().manual_seed(0))
        assert not (out.tokens == MASK_ID).any()


# --- bad hyperparameters ------------------------------------------------------------------------

@pytest.mark.parametrize("params,message", [
    (dict(dropout="gauss"), "cache.dropout='gauss'"),
    (dict(window=0), "cache.window=0"),
    (dict(k_sigma=0), "cache.k_sigma=0"),
    (dict(scale=-1.0), "cache.scale=-1.0"),
    (dict(dropout="uniform"), "cache.keep=None"),
    (dict(dropout="uniform", keep=-1), "cache.keep=-1"),
    (dict(keep=3), "cache.keep=3 applies to cache.dropout=uniform only"),
    (dict(distance="far"), "cache.distance='far'"),
    (dict(base="full"), "cache.base='full'"), (dict(base=["a"]), "cache.base=\\['a'\\]"),
    (dict(refresh_interval=2), "cache.refresh_interval=2"),
    (dict(base="prefix", refresh_interval=0), "cache.refresh_interval=0"),
    (dict(dream_rows="shifted"), "cache.dream_rows='shifted'"),
    (dict(draw="float16"), "cache.draw='float16'"),
    (dict(draw="float32", distance="paper"), "cache.draw=float32 reproduces the authors' sampler"),
])
def test_bad_hyperparameters(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_cache("dpad", **params)


def test_refuses_a_remasking_decoder():
    """WINO's verification rows attend to every stored key, the dropped suffix's uncomputed K/V included."""
    with pytest.raises(ValueError, match="cache=dpad cannot run with decoding='wino'"):
        build_cache("dpad").check(build_decoder("wino", block_length=BLOCK))
    build_cache("dpad").check(decoder("threshold"))
