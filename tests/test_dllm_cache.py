"""dLLM-Cache: exact at refresh 1, the reference's value-write and first-layer rules (hand-traced),
per-layer update counts and their accounting, padding masked (batch == one by one)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dllm.cache.dllm_cache as module
import dllm.decoding.loop as loop
from dllm.cache.base import build_cache
from dllm.cache.dllm_cache import DLLMCache, FeatureReuse, value_share
from dllm.decoding.base import build_decoder, top_n_mask
from dllm.decoding.loop import generate
from dllm.models.transformer import KVStore, apply_rope, rope_cos_sin

from conftest import MASK_ID, random_prompts, tiny_args, tiny_net, with_weights

GEN = 16
RULES = [dict(value_write=w, refresh_first_layer=f) for w in ("all", "recomputed") for f in (True, False)]
RULE_IDS = [f"{r['value_write']}-{'first' if r['refresh_first_layer'] else 'nofirst'}" for r in RULES]


def low_confidence(gen: int = GEN):
    return build_decoder("low_confidence", steps=gen, block_length=8)


@pytest.mark.parametrize("rules", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_refresh_every_step_reproduces_none(family, weights, lengths, rules):
    net = with_weights(tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,)), weights)
    prompts = random_prompts(lengths)
    base = generate(net, prompts, low_confidence(), build_cache("none"), GEN)
    forced = generate(net, prompts, low_confidence(),
                      build_cache("dllm_cache", prompt_interval=1, response_interval=1, **rules), GEN)
    assert torch.equal(forced.tokens, base.tokens)
    assert forced.recompute_ratio == 1.0


@pytest.mark.parametrize("rules", RULES, ids=RULE_IDS)
def test_padding_is_masked_batch_equals_one_by_one(family, rules):
    """The reference never masks padding; here a padded row decodes exactly as it does alone."""
    net = tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))
    prompts = random_prompts((7, 3, 10))
    method = lambda: build_cache("dllm_cache", prompt_interval=8, response_interval=4, **rules)  # noqa: E731
    batch = generate(net, prompts, low_confidence(), method(), GEN)
    alone = torch.cat([generate(net, [p], low_confidence(), method(), GEN).tokens for p in prompts])
    assert torch.equal(batch.tokens, alone)


# ------------------------------------------------------------------------------ hand-traced steps
class Probe:
    """Per step: the tokens of the forward, each layer's input (normed) and computed positions, and
    after the step the K/V store and the feature caches (the store is caught where the loop makes it)."""

    def __init__(self, monkeypatch) -> None:
        self.steps: list[dict] = []
        probe = self

        class Store(KVStore):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                probe.store = self

        class Hook(FeatureReuse):
            def begin(self, rows, rows_valid, required):
                super().begin(rows, rows_valid, required)
                probe.steps[-1]["rows"] = rows[rows_valid].tolist()

            def pick(self, layer, block, x_norm):
                out = super().pick(layer, block, x_norm)
                probe.steps[-1]["x_norm"][layer] = x_norm.clone()
                probe.steps[-1]["picked"][layer] = self.picked_positions.clone()
                return out

        class Cache(DLLMCache):
            def select(self, view):
                probe.steps.append({"x": view.x.clone(), "x_norm": {}, "picked": {}})
                return super().select(view)

            def observe(self, view, outcome):
                probe.steps[-1]["k"] = [k.clone() for k in probe.store.k]
                probe.steps[-1]["v"] = [v.clone() for v in probe.store.v]
                features = self.features.items()
                probe.steps[-1]["features"] = {i: {n: t.clone() for n, t in f.items()} for i, f in features}

        monkeypatch.setattr(loop, "KVStore", Store)
        monkeypatch.setattr(module, "FeatureReuse", Hook)
        self.Cache = Cache


def rows_of(store_tensor: torch.Tensor) -> torch.Tensor:
    """(1, Hkv, T + 1, hd) store of batch row 0 -> (T + 1, Hkv * hd), one row per position."""
    return store_tensor[0].transpose(0, 1).flatten(1)


P, G = 6, 8  # one prompt of 6 tokens, no padding: the forward's rows are positions P..P+G-1 in order


@pytest.mark.parametrize("value_write", ["all", "recomputed"])
def test_value_write_rule_after_a_partial_step(monkeypatch, value_write):
    """Step 0 is full; step 1 refreshes nothing (Kp = Kr = 100), rho = 0.25 picks 2 of 8 response rows
    per layer at layers >= 1 (layer 0 refreshed in full). Traced by hand at every layer >= 1:
    value_write=all: the V cache of every response position holds the fresh wv(norm(h)) of this step,
    of the chosen rows and of the others alike; recomputed: the others keep step 0's value. Either
    way the keys of the rows not chosen and the prompt's K/V stay as step 0 left them, and the
    chosen rows' attention output is softmax(q Kᵀ) V over the store as it is after the step, so under
    `all` the chosen rows attended to the others' fresh values (written before attention, not after)."""
    probe = Probe(monkeypatch)
    net = tiny_net(tiny_args("llada", n_layers=3), logit_scale=8.0, silent_ids=(MASK_ID,))
    cache = probe.Cache(prompt_interval=100, response_interval=100, update_ratio=0.25, value_write=value_write)
    generate(net, random_prompts((P,)), build_decoder("low_confidence", steps=G, block_length=G), cache, G)
    before, step = probe.steps[0], probe.steps[1]
    a = net.args
    for layer in range(1, a.n_layers):
        block = net.layers[layer]
        fresh = block.attn.wv(step["x_norm"][layer])[0]  # (G, kv width): rows = positions P..P+G-1
        chosen = step["picked"][layer][0]
        assert len(chosen) == 2 and bool(((chosen >= P) & (chosen < P + G)).all())
        others = torch.tensor([p for p in range(P, P + G) if p not in chosen.tolist()])
        v_before, v_after = rows_of(before["v"][layer]), rows_of(step["v"][layer])
        k_before, k_after = rows_of(before["k"][layer]), rows_of(step["k"][layer])
        cached_v = step["features"][layer]["v"][0]

        torch.testing.assert_close(v_after[chosen], fresh[chosen - P], rtol=0, atol=1e-6)
        assert not torch.allclose(fresh[others - P], v_before[others], atol=1e-4)  # the step did change them
        if value_write == "all":
            torch.testing.assert_close(v_after[P : P + G], fresh, rtol=0, atol=1e-6)
            torch.testing.assert_close(cached_v[P : P + G], fresh, rtol=0, atol=1e-6)
        else:
            assert torch.equal(v_after[others], v_before[others])
            assert torch.equal(cached_v[others], before["features"][layer]["v"][0][others])
        assert torch.equal(k_after[others], k_before[others])  # keys of rows not chosen stay cached
        assert torch.equal(v_after[:P], v_before[:P]) and torch.equal(k_after[:P], k_before[:P])

        # The chosen rows' attention, by hand over the store as it is after the step.
        x = step["x_norm"][layer][:, chosen - P]
        q = block.attn.wq(x).view(1, 2, a.n_heads, a.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(chosen[None], a.head_dim, a.rope_theta, q.dtype)
        q = apply_rope(q, cos, sin)
        T = P + G
        out = F.scaled_dot_product_attention(q, step["k"][layer][:, :, :T], step["v"][layer][:, :, :T], enable_gqa=True)
        out = block.attn.wo(out.transpose(1, 2).reshape(1, 2, a.n_heads * a.head_dim))[0]
        torch.testing.assert_close(step["features"][layer]["attn"][0, chosen], out, rtol=0, atol=1e-5)


def first_layer_of_full_forward(net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Layer 0's attention output, FFN output and values of a plain full forward of tokens x (1, T)."""
    block, a, T = net.layers[0], net.args, x.shape[1]
    h = net.tok_embeddings(x)
    cos, sin = rope_cos_sin(torch.arange(T)[None], a.head_dim, a.rope_theta, h.dtype)
    x_norm = block.attn_norm(h)
    attn, _ = block.attn(x_norm, cos, sin, torch.ones(1, 1, 1, T, dtype=torch.bool), None, 0, None, False)
    return {"attn": attn[0], "ffn": block.ffn(block.ffn_norm(h + attn))[0], "v": block.attn.wv(x_norm)[0]}


@pytest.mark.parametrize("refresh_first_layer", [True, False])
def test_first_layer_refreshed_every_step(monkeypatch, family, refresh_first_layer):
    """Kp = Kr = 100: after step 0 nothing is refreshed by the intervals. With refresh_first_layer,
    layer 0 recomputes every response row at every step, so after each step its cached attention,
    FFN outputs and values of the response equal those of a full forward of that step's tokens (the
    prompt's layer-0 K/V depend on its embeddings only). Without it they go stale (masked rows whose
    layer-0 input did not change are never picked there)."""
    probe = Probe(monkeypatch)
    net = tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))
    cache = probe.Cache(prompt_interval=100, response_interval=100, update_ratio=0.25,
                        refresh_first_layer=refresh_first_layer)
    generate(net, random_prompts((P,)), build_decoder("low_confidence", steps=G, block_length=G), cache, G)
    stale = 0
    for step in probe.steps[1:]:
        expected = first_layer_of_full_forward(net, step["x"])
        got = step["features"][0]
        if refresh_first_layer:
            # every row of the forward: the response (and for Dream the prompt's last row while P is masked)
            assert sorted(step["picked"][0][0].tolist()) == step["rows"] and step["rows"][-G:] == list(range(P, P + G))
        for part in ("attn", "ffn", "v"):
            close = torch.allclose(got[part][0, P : P + G], expected[part][P:], rtol=0, atol=1e-5)
            assert close or not refresh_first_layer, (part, step["x"])
            stale += not close
    assert refresh_first_layer or stale > 0


def test_prompt_rows_at_the_first_layer_change_nothing(family):
    """The reference also recomputes the prompt at layer 0 on every step; we do so only when the
    prompt is refreshed, because nothing reads that work. Adding the prompt rows to every forward
    (so that layer 0 recomputes them too) leaves every token unchanged."""

    class WithPrompt(DLLMCache):
        def select(self, view):
            request = super().select(view)
            if not request.full:
                request.refresh[:, : self.ctx.prompt_length] = True
            return request

    net = tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))
    prompts = random_prompts((7, 3, 10))
    params = dict(prompt_interval=8, response_interval=3, update_ratio=0.25)
    ours = generate(net, prompts, low_confidence(), DLLMCache(**params), GEN)
    reference_like = generate(net, prompts, low_confidence(), WithPrompt(**params), GEN)
    assert torch.equal(ours.tokens, reference_like.tokens)
    assert reference_like.active_token_layers > ours.active_token_layers


# ------------------------------------------------------------------------------ counts and accounting
class CountingHook(FeatureReuse):
    per_layer: list[list[int]] = []

    def pick(self, layer, block, x_norm):
        picked, valid, value = super().pick(layer, block, x_norm)
        CountingHook.per_layer.append([self.refresh_prompt, self.refresh_response, layer, int(valid.sum())])
        return picked, valid, value


@pytest.mark.parametrize("value_write", ["all", "recomputed"])
@pytest.mark.parametrize("refresh_first_layer", [True, False])
def test_rows_recomputed_per_layer_follow_the_intervals(monkeypatch, refresh_first_layer, value_write):
    """Prompt 10, gen 16, Kp=8, Kr=4, rho=0.25: full at 0 and 8, response-only at 4 and 12,
    otherwise ceil(0.25 x 16) = 4 response rows per layer (the prompt never); with
    refresh_first_layer, layer 0 computes every row of the forward in full (the 16 response rows;
    26 when the prompt is refreshed). Each other response row computes its value projection only,
    which counts wv's share of the block's linear weights; writing it (value_write=all) costs none."""
    monkeypatch.setattr(module, "FeatureReuse", CountingHook)
    CountingHook.per_layer = []
    net = tiny_net(tiny_args("llada"), logit_scale=8.0, silent_ids=(MASK_ID,))
    out = generate(net, random_prompts((10,)), low_confidence(),
                   build_cache("dllm_cache", prompt_interval=8, response_interval=4, update_ratio=0.25,
                               value_write=value_write, refresh_first_layer=refresh_first_layer), GEN)
    a = net.args
    L = a.n_layers
    # wv's share of a row's linear work, by hand: (dim x kv) / (q, k, v, o, gate, up, down)
    kv_width = a.n_kv_heads * a.head_dim
    share = a.dim * kv_width / (2 * a.dim * a.dim + 2 * a.dim * kv_width + 3 * a.dim * a.ffn_dim)
    assert value_share(a) == pytest.approx(share)
    expected, value_only = [], 0
    for step in range(GEN):
        prompt, response = step % 8 == 0, step % 4 == 0
        for layer in range(L):
            first = layer == 0 and refresh_first_layer
            count = (10 if prompt else 0) + (16 if response or first else math.ceil(0.25 * 16))
            expected.append([prompt, response, layer, count])
            value_only += 0 if response or first else 16 - math.ceil(0.25 * 16)
    assert CountingHook.per_layer == expected
    assert out.active_token_layers == pytest.approx(sum(row[3] for row in expected) + value_only * share)


@pytest.mark.parametrize("rounding, per_layer", [("ceil", math.ceil(0.3 * 16)), ("floor", math.floor(0.3 * 16))])
def test_update_rounding(monkeypatch, rounding, per_layer):
    """rho n = 4.8 response rows: ceil updates 5 per layer (ours), floor 4 (the reference's
    int(gen_length * rho)); layers other than 0 between refreshes."""
    monkeypatch.setattr(module, "FeatureReuse", CountingHook)
    CountingHook.per_layer = []
    net = tiny_net(tiny_args("llada"), logit_scale=8.0, silent_ids=(MASK_ID,))
    generate(net, random_prompts((10,)), low_confidence(),
             build_cache("dllm_cache", prompt_interval=8, response_interval=4, update_ratio=0.3,
                         update_rounding=rounding), GEN)
    partial = {count for prompt, response, layer, count in CountingHook.per_layer if not response and layer > 0}
    assert partial == {per_layer}


def test_no_update_ratio_computes_no_values(monkeypatch):
    """rho = 0 (as in the reference): between refreshes no value is projected, written or counted."""
    monkeypatch.setattr(module, "FeatureReuse", CountingHook)
    CountingHook.per_layer = []
    net = tiny_net(tiny_args("llada"), logit_scale=8.0, silent_ids=(MASK_ID,))
    out = generate(net, random_prompts((10,)), low_confidence(),
                   build_cache("dllm_cache", prompt_interval=8, response_interval=4, update_ratio=0.0), GEN)
    assert out.active_token_layers == sum(row[3] for row in CountingHook.per_layer)


def test_bad_settings():
    with pytest.raises(ValueError, match="prompt_interval=0"):
        build_cache("dllm_cache", prompt_interval=0)
    with pytest.raises(ValueError, match="update_ratio=1.5"):
        build_cache("dllm_cache", update_ratio=1.5)
    with pytest.raises(ValueError, match="value_write='some'.*all, recomputed"):
        build_cache("dllm_cache", value_write="some")
    with pytest.raises(ValueError, match="refresh_first_layer='yes'"):
        build_cache("dllm_cache", refresh_first_layer="yes")
    with pytest.raises(ValueError, match="update_rounding='round'.*ceil, floor"):
        build_cache("dllm_cache", update_rounding="round")



@pytest.mark.parametrize("tie_break", ["earlier", "topk"])
def test_unchanged_values_tie_exactly_under_tie_break_earlier(monkeypatch, tie_break):
    """Rows whose value did not change (here: a row of the batch waits while another finishes its
    block) tie at similarity 1, and under tie_break=earlier the earlier of them are updated (a stable
    ranking); tie_break=topk ranks the similarities with torch.topk, as the reference. (That such a
    value counts exactly 1, not 1 up to an ulp of rounding, is pinned by tests/test_golden.py.)"""
    calls = []
    original = module.top_n_mask

    def spy(score, n, stable=False):
        calls.append((score.clone(), n.clone(), stable))
        return original(score, n, stable)

    monkeypatch.setattr(module, "top_n_mask", spy)
    net = tiny_net(tiny_args("llada", max_seq_len=64), seed=11, logit_scale=4.0, silent_ids=(MASK_ID,))
    decoder = build_decoder("dream", steps=16, alg="entropy", block_length=8, first_token="commit")
    cache = build_cache("dllm_cache", prompt_interval=5, response_interval=3, update_ratio=0.25, tie_break=tie_break)
    generate(net, random_prompts([7, 4, 10], seed=3), decoder, cache, GEN)
    assert calls and all(stable is (tie_break == "earlier") for _, _, stable in calls)
    tied = [(score, n) for score, n, _ in calls if (score[torch.isfinite(score)] == -1.0).sum() > int(n.max())]
    if tie_break == "earlier":
        assert tied  # more unchanged candidates than updates: the tie the stable ranking settles
        for score, n in tied:
            chosen = original(score, n, stable=True)
            for row in range(score.shape[0]):
                ones = (score[row] == -1.0).nonzero()[:, 0]
                picked = chosen[row, ones]
                assert not (picked[1:] & ~picked[:-1]).any()  # the earlier ones of the tie


def test_top_n_mask_stable_takes_the_earlier_of_equal_scores():
    score = torch.tensor([[0.5, 0.9, 0.5, 0.5, float("-inf")], [0.5, 0.5, 0.1, 0.5, 0.5]])
    chosen = top_n_mask(score, torch.tensor([2, 3]), stable=True)
    assert chosen.tolist() == [[True, True, False, False, False], [True, True, False, True, False]]
    padded = torch.cat([torch.full((2, 3), float("-inf")), score], 1)  # the same rows, left-padded
    assert torch.equal(top_n_mask(padded, torch.tensor([2, 3]), stable=True)[:, 3:], chosen)
    with pytest.raises(ValueError, match="cache.tie_break='first' must be one of earlier, topk"):
        build_cache("dllm_cache", tie_break="first")
