"""cache=sparse_dllm: Sparse-dLLM's attention-guided key eviction with a delayed block-wise update."""
from __future__ import annotations

import math

import pytest
import torch

from dllm.cache.base import ActiveRequest, CacheMethod, build_cache
from dllm.cache.sparse_dllm import MeanQueryScores, SparseDLLM, block_scores, keep_keys
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate
from dllm.models.transformer import KVStore, apply_rope, rope_cos_sin

from conftest import MASK_ID, random_prompts, tiny_args, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

GEN, BLOCK = 16, 8


def low_confidence():
    return build_decoder("low_confidence", steps=GEN, block_length=BLOCK)


def net_of(family: str):
    return tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))


@pytest.mark.parametrize("keep_ratio,score", [(1.0, "attention"), (0.3, "attention"), (0.3, "mean_query")])
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_update_every_step_reproduces_none(family, keep_ratio, score, lengths):
    """Every step selects, so every step is a full forward (with score=mean_query: through the hook)."""
    net, prompts = net_of(family), random_prompts(lengths)
    base = generate(net, prompts, low_confidence(), build_cache("none"), GEN)
    every = generate(net, prompts, low_confidence(),
                     build_cache("sparse_dllm", keep_ratio=keep_ratio, update_interval=1, score=score), GEN)
    assert torch.equal(every.tokens, base.tokens)
    assert every.recompute_ratio == 1.0


class BlockAfterTwoFull(CacheMethod):
    """The authors' schedule with nothing evicted, restated: block steps 0 and 1 are full forwards,
    later steps recompute the block only and attend to every key."""

    name = "block_after_two_full"

    def select(self, view):
        if view.plan.block_step <= 1:
            return ActiveRequest.everything()
        lo, hi = view.plan.window
        block = torch.zeros_like(view.masked)
        block[:, lo:hi] = True
        return ActiveRequest(predict=view.masked & block, refresh=block)


@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_keeping_every_key_is_the_block_schedule(family, lengths):
    net, prompts = net_of(family), random_prompts(lengths)
    reference = generate(net, prompts, low_confidence(), BlockAfterTwoFull(), GEN)
    kept_all = generate(net, prompts, low_confidence(), build_cache("sparse_dllm", keep_ratio=1.0), GEN)
    assert torch.equal(kept_all.tokens, reference.tokens)
    assert kept_all.recompute_ratio == reference.recompute_ratio < 1


def test_eviction_hand_traced():
    """Positions 0..7, block [4, 6); row 1 has position 0 as left padding."""
    scores = torch.tensor([
        [0.05, 0.30, 0.02, 0.01, 0.9, 0.9, 0.20, 0.03],
        [0.05, 0.30, 0.02, 0.01, 0.9, 0.9, 0.20, 0.03],
    ])
    real = torch.ones(2, 8, dtype=torch.bool)
    real[1, 0] = False
    candidates = real.clone()
    candidates[:, 4:6] = False

    def kept(ratio, kernel):
        return [row.nonzero().flatten().tolist() for row in keep_keys(scores, candidates, ratio, kernel)]

    # No pooling: the top floor(6 * 0.5) = 3 of row 0 (0.30, 0.20, 0.05), floor(5 * 0.5) = 2 of row 1.
    assert kept(0.5, 1) == [[0, 1, 6], [1, 6]]
    # Kernel 3 over the candidate sequence 0 1 2 3 | 6 7: pooled 0.30 0.30 0.30 0.20 | 0.20 0.20
    # (position 3's neighbour is 6, across the block); ties go to the earlier position.
    # Row 1 (1 2 3 | 6 7): 0.30 0.30 0.20 | 0.20 0.20.
    assert kept(0.5, 3) == [[0, 1, 2], [1, 2]]
    # floor(6 * 0.34) = 2, floor(5 * 0.34) = 1; keep_ratio 1 keeps every candidate, never the block
    # nor padding.
    assert kept(0.34, 3) == [[0, 1], [1]]
    assert kept(1.0, 3) == [[0, 1, 2, 3, 6, 7], [1, 2, 3, 6, 7]]


def test_tie_break_topk_keeps_what_torch_topk_returns():
    """Pooling copies a maximum onto its neighbours, so exact ties at the keep cut-off are common.
    tie_break=topk keeps, per row, what torch.topk returns for the row's (1, n) pooled candidate
    scores (the authors' call); earlier keeps the earlier positions."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 40), generator=gen).float()  # few distinct values: many ties
    candidates = torch.rand(3, 40, generator=gen) > 0.2
    candidates[:, 16:24] = False  # the block
    for kernel, ratio in ((1, 0.5), (3, 0.3), (5, 0.7)):
        topk, earlier = (keep_keys(scores, candidates, ratio, kernel, tie) for tie in ("topk", "earlier"))
        assert topk.sum(1).tolist() == earlier.sum(1).tolist() and not (topk & ~candidates).any()
        for row in range(3):
            positions = candidates[row].nonzero()[:, 0]
            pooled = scores[row, positions][None, None]
            if kernel > 1:
                pooled = torch.nn.functional.max_pool1d(pooled, kernel, stride=1, padding=kernel // 2)
            expected = positions[torch.topk(pooled[0], int(len(positions) * ratio), dim=-1).indices[0]]
            assert sorted(topk[row].nonzero()[:, 0].tolist()) == sorted(expected.tolist())
    assert not torch.equal(*(keep_keys(scores, candidates, 0.3, 3, tie) for tie in ("topk", "earlier")))


def test_block_scores_average_the_block_rows():
    """Attention of rows at positions 2, 3, 5 (and a padding row) over 6 positions; block [2, 4)."""
    rows = torch.tensor([[2, 3, 5, 6]])
    rows_valid = torch.tensor([[True, True, True, False]])
    attention = torch.tensor([[
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
        [0.1, 0.3, 0.1, 0.1, 0.3, 0.1],
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # outside the block: not counted
        [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],  # padding row: not counted
    ]])
    expected = torch.tensor([[0.3, 0.2, 0.1, 0.1, 0.2, 0.1]])
    assert torch.allclose(block_scores(attention, rows, rows_valid, 2, 4), expected)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mean_query_score_is_the_block_mean_query_logit(family, qk_norm):
    """The hook's score against q and k read off the model's own projections in a plain forward:
    (mean over the block rows of q_h) . k_j, per query head h (GQA: K/V head h // 2), averaged."""
    args = tiny_args(family, qk_norm=qk_norm)
    net = tiny_net(args, dtype=torch.float64)
    B, T, lo, hi = 2, 12, 6, 9
    tokens = torch.randint(0, 60, (B, T), generator=torch.Generator().manual_seed(1))
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :3] = False  # left padding
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    captured = []
    handles = [layer.attn.register_forward_hook(lambda m, inp, out: captured.append(inp[0])) for layer in net.layers]
    net.hidden(tokens, positions, real[:, None, None, :])
    for handle in handles:
        handle.remove()

    hook = MeanQueryScores(positions, lo, hi)
    rows = torch.arange(T).expand(B, T)
    hook.begin(rows, torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool))
    key_mask = torch.cat([real, torch.zeros(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
    net.hidden(tokens, positions, key_mask, KVStore(args, B, T, "cpu", torch.float64), rows, False, hook)
    assert len(hook.scores) == args.n_layers and hook.token_layers == B * T * args.n_layers

    cos, sin = rope_cos_sin(positions, args.head_dim, args.rope_theta, torch.float64)
    for layer, (x, score) in enumerate(zip(captured, hook.scores)):
        attn = net.layers[layer].attn
        q = attn.wq(x).view(B, T, args.n_heads, args.head_dim)
        k = attn.wk(x).view(B, T, args.n_kv_heads, args.head_dim)
        if qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        expected = torch.zeros(B, T, dtype=torch.float64)
        for h in range(args.n_heads):
            mean_q = q[:, h, lo:hi].mean(1)  # (B, hd)
            expected += (k[:, h // 2] * mean_q[:, None, :]).sum(-1) / args.n_heads
        assert torch.allclose(score, expected), f"layer {layer}"


class Traced(SparseDLLM):
    """Keeps, per step, the request and, on selecting steps, the attention it was given."""

    def start(self, ctx):
        super().start(ctx)
        self.log = []

    def select(self, view):
        request = super().select(view)
        self.log.append(dict(block_step=view.plan.block_step, window=view.plan.window, masked=view.masked.clone(),
                             request=request))
        return request

    def observe(self, view, outcome):
        super().observe(view, outcome)
        entry = self.log[-1]
        entry.update(active=outcome.active.clone(), rows=outcome.rows, rows_valid=outcome.rows_valid,
                     attention=outcome.attention, kept=self.kept)


@pytest.mark.parametrize("update_interval,delay", [(None, 1), (3, 1), (None, 0)])
def test_schedule_and_key_sets_traced(family, update_interval, delay):
    """Prompts of 6 and 4 tokens (row 1 left-padded by 2), 16 tokens in blocks of 8, one per step."""
    net = net_of(family)
    cache = Traced(keep_ratio=0.5, kernel_size=3, update_interval=update_interval, delay=delay)
    out = generate(net, random_prompts((6, 4)), low_confidence(), cache, GEN)
    P, T = 6, 22
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, :2] = False
    selecting = {delay} | ({delay + k * update_interval for k in range(1, BLOCK)} if update_interval else set())
    assert [e["block_step"] for e in cache.log] == list(range(BLOCK)) * 2
    kept = None
    for step, entry in enumerate(cache.log):
        block_step, request = entry["block_step"], entry["request"]
        lo = P + (step // BLOCK) * BLOCK
        assert entry["window"] == (lo, lo + BLOCK)
        block = torch.zeros(2, T, dtype=torch.bool)
        block[:, lo : lo + BLOCK] = True
        if block_step < delay or block_step in selecting:
            assert request.full and request.keys is None and entry["active"].all(), f"step {step}"
        else:
            expected = block.clone()
            if family == "dream":  # the block's first position is predicted from lo - 1 while masked
                expected[:, lo - 1] = entry["masked"][:, lo]
            assert torch.equal(entry["active"], expected), f"step {step}"
            assert len(request.keys) == net.args.n_layers
            for layer, keys in enumerate(request.keys):
                assert torch.equal(keys, kept[layer] | block)
                # floor(half of the real positions outside the block) + the block
                assert (keys & real).sum(1).tolist() == [math.floor((T - BLOCK) / 2) + BLOCK,
                                                         math.floor((T - 2 - BLOCK) / 2) + BLOCK]
        if block_step in selecting:  # the selection is the rule applied to the forward's attention
            candidates = real.clone()
            candidates[:, lo : lo + BLOCK] = False
            kept = [keep_keys(block_scores(a[:, :, :T], entry["rows"], entry["rows_valid"], lo, lo + BLOCK),
                              candidates, 0.5, 3) for a in entry["attention"]]
            assert all(torch.equal(mine, theirs) for mine, theirs in zip(entry["kept"], kept))
    assert out.attention_pairs < out.total_attention_pairs


@pytest.mark.parametrize("decoding,params", [
    ("low_confidence", dict(steps=GEN, block_length=BLOCK)),
    ("low_confidence", dict(steps=6, block_length=BLOCK)),  # several tokens per step, unevenly
    ("random", dict(steps=GEN, block_length=BLOCK)),
    ("threshold", dict(block_length=BLOCK, threshold=0.9)),
    ("certainty_prior", dict(steps=6, sigma=3.0)),  # one block: only the prompt is evicted
    ("dream", dict(steps=6, alg="entropy", block_length=BLOCK)),
    ("dream", dict(steps=GEN, alg="maskgit_plus", block_length=BLOCK, first_token="commit")),
])
@pytest.mark.parametrize("cache", [dict(keep_ratio=0.1, kernel_size=1), dict(keep_ratio=0.5, delay=0, update_interval=2),
                                   dict(score="mean_query"), dict(score="mean_query", tie_break="topk")])
def test_no_mask_left(family, decoding, params, cache):
    if decoding == "dream" and family == "llada":
        pytest.skip("Dream's decoding is for the Dream family")
    out = generate(net_of(family), random_prompts((7, 3)), build_decoder(decoding, **params),
                   build_cache("sparse_dllm", **cache), GEN)
    assert not (out.tokens == MASK_ID).any()


@pytest.mark.parametrize("params,message", [
    (dict(keep_ratio=0), "keep_ratio=0 must be a number in"),
    (dict(keep_ratio=1.5), "keep_ratio=1.5 must be a number in"),
    (dict(keep_ratio="half"), "keep_ratio='half'"),
    (dict(kernel_size=2), "kernel_size=2 must be an odd integer"),
    (dict(kernel_size=0), "kernel_size=0 must be an odd integer"),
    (dict(update_interval=0), "update_interval=0 must be an integer >= 1 or null"),
    (dict(delay=-1), "delay=-1 must be an integer >= 0"),
    (dict(score="logits"), "score='logits' \\(allowed: \\['attention', 'mean_query'\\]\\)"),
    (dict(tie_break="later"), "tie_break='later' \\(allowed: \\['earlier', 'topk'\\]\\)"),
])
def test_bad_hyperparameters(params, message):
    with pytest.raises(ValueError, match=message):
        build_cache("sparse_dllm", **params)
