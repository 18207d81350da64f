"""Block-diffusion models (block-causal attention): the layout, the exact prefix cache, the
models' own decoders against plain re-statements of the authors' generation loops, and the
refusals.

The references below recompute the whole sequence with ``Transformer.forward(block_length=...)``
(a dense block-causal mask, batch 1) each step, as LLaDA2.0's ``generate`` does; SDAR's and
Fast-dLLM v2's KV-cached loops compute the same numbers (their cache is exact), which is what
``cache=prefix`` must reproduce token for token.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import MASK_ID, random_prompts, tiny_args, tiny_net
from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.block_diffusion import block_schedule
from dllm.decoding.layout import lay_out
from dllm.decoding.loop import generate

pytestmark = pytest.mark.usefixtures("one_thread")
GEN = 13


@pytest.fixture(scope="module")
def nets():
    """Block-causal tiny models without (llada) and with (dream) the logit shift; [MASK] is never
    the favourite, as in a trained model (the authors' code would commit it)."""
    return {family: tiny_net(tiny_args(family, block_causal=True), seed=7, logit_scale=4.0, silent_ids=(MASK_ID,))
            for family in ("llada", "dream")}


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.softmax(-1)
    return probs.argmax(-1), probs.max(-1).values


def llada2_reference(net, prompt, gen_length, block, steps, threshold, static=False):
    """LLaDA2.0's ``generate`` (and SDAR's ``block_diffusion_generate``), batch 1, greedy."""
    P = len(prompt)
    total = math.ceil((P + gen_length) / block) * block
    x = torch.full((total,), MASK_ID)
    x[:P] = torch.tensor(prompt)
    schedule = block_schedule(block, steps)
    for end in range((P // block + 1) * block, total + 1, block):
        for step in range(steps):
            active = x[end - block : end] == MASK_ID
            if not active.any():
                break
            logits = net(x[None, :end], block_length=block)[0, -block:]
            tokens, p = greedy(logits)
            confidence = torch.where(active, p, float("-inf"))
            k = schedule[step]
            confident = confidence > threshold
            if not static and confident.sum() >= k:
                transfer = confident
            else:
                transfer = torch.zeros(block, dtype=torch.bool)
                transfer[confidence.topk(min(k, int(active.sum()))).indices] = True
            x[end - block : end][transfer] = tokens[transfer]
    return x[P : P + gen_length].tolist()


def fast_dllm_v2_reference(net, prompt, gen_length, block, sub_block, threshold):
    """Fast-dLLM v2's ``generate`` (no block cache), batch 1, greedy: a prompt's whole blocks,
    then per block: its first token from the previous position if needed, sub-blocks left to right."""
    x = list(prompt)
    P = len(prompt)

    def logits_of(seq):
        return net(torch.tensor([seq]), block_length=block)[0]

    def predictions(seq):  # position j predicted from j - 1 (position 0, a prompt token, from itself)
        logits = logits_of(seq)
        return torch.cat([logits[:1], logits[:-1]])

    if P % block == 0:
        x.append(int(logits_of(x)[-1].argmax()))
    while len(x) < P + gen_length:
        x += [MASK_ID] * (-len(x) % block)
        lo = len(x) - block
        for start in range(lo, lo + block, sub_block):
            while any(t == MASK_ID for t in x[start : start + sub_block]):
                tokens, p = greedy(predictions(x)[start : start + sub_block])
                masked = torch.tensor([t == MASK_ID for t in x[start : start + sub_block]])
                confidence = torch.where(masked, p, float("-inf"))
                transfer = confidence > threshold
                transfer[confidence.argmax()] = True
                for i in transfer.nonzero().flatten().tolist():
                    x[start + i] = int(tokens[i])
        x.append(int(logits_of(x)[-1].argmax()))  # the commit forward: the next block's first token
    return x[P : P + gen_length]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("block, steps, threshold, static", [(4, 4, 0.3, False), (8, 4, 0.95, False), (8, 8, 0.9, True),
                                                            (4, 2, 0.6, False)])
def test_block_diffusion_matches_reference(nets, cache, block, steps, threshold, static):
    net = nets["llada"]
    decoder = dict(block_length=block, steps=steps, threshold=threshold, remasking="static" if static else "dynamic")
    for prompt in random_prompts([3, 8, 13], seed=block + steps):
        out = generate(net, [prompt], build_decoder("block_diffusion", **decoder), build_cache(cache), GEN)
        assert out.tokens[0].tolist() == llada2_reference(net, prompt, GEN, block, steps, threshold, static)


@pytest.mark.parametrize("cache", ["none", "prefix"])
@pytest.mark.parametrize("block, sub_block, threshold", [(8, 4, 0.5), (8, 8, 1.0), (4, 2, 0.2)])
def test_fast_dllm_v2_matches_reference(nets, cache, block, sub_block, threshold):
    net = nets["dream"]
    for prompt in random_prompts([5, 8, 12], seed=block * sub_block):
        decoder = build_decoder("fast_dllm_v2", block_length=block, sub_block_length=sub_block, threshold=threshold)
        out = generate(net, [prompt], decoder, build_cache(cache), GEN)
        assert out.tokens[0].tolist() == fast_dllm_v2_reference(net, prompt, GEN, block, sub_block, threshold)


DECODERS = [("llada", "block_diffusion", dict(block_length=4, steps=4, threshold=0.4)),
            ("llada", "block_diffusion", dict(block_length=8, steps=4, remasking="static")),
            ("dream", "block_diffusion", dict(block_length=4, steps=2, threshold=0.3)),
            ("dream", "fast_dllm_v2", dict(block_length=8, sub_block_length=4, threshold=0.5))]


@pytest.mark.parametrize("family, name, params", DECODERS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_left_padded_batch_equals_each_row(nets, family, name, params, cache):
    """Rows whose prompts end at different offsets in their blocks decode as they do alone."""
    net, prompts = nets[family], random_prompts([5, 9, 12, 2], seed=3)
    batch = generate(net, prompts, build_decoder(name, **params), build_cache(cache), GEN)
    for row, prompt in enumerate(prompts):
        alone = generate(net, [prompt], build_decoder(name, **params), build_cache(cache), GEN)
        assert batch.tokens[row].tolist() == alone.tokens[0].tolist(), row


@pytest.mark.parametrize("family, name, params", DECODERS)
def test_exact_prefix_cache_equals_recomputing_everything(nets, family, name, params):
    net, prompts = nets[family], random_prompts([5, 9, 12], seed=4)
    full = generate(net, prompts, build_decoder(name, **params), build_cache("none"), GEN)
    cached = generate(net, prompts, build_decoder(name, **params), build_cache("prefix"), GEN, record_trace=True)
    assert torch.equal(full.tokens, cached.tokens)
    assert cached.nfe == full.nfe
    assert cached.active_token_layers < full.active_token_layers < full.total_token_layers
    assert cached.attention_pairs < full.attention_pairs < full.total_attention_pairs


def test_finished_blocks_are_computed_once(nets):
    """With cache=prefix every position before the current block is computed exactly once after its
    block and all earlier ones are final, and never again; later blocks never."""
    net, block = nets["llada"], 4
    prompts = random_prompts([6, 11], seed=5)
    layout = lay_out(prompts, GEN, MASK_ID, 0, "cpu", block)
    out = generate(net, prompts, build_decoder("block_diffusion", block_length=block, steps=4, threshold=0.5),
                   build_cache("prefix"), GEN, record_trace=True)
    trace = torch.stack(out.trace)  # (steps, B, T)
    T = trace.shape[2]
    blocks_computed = trace.view(*trace.shape[:2], T // block, block)
    assert torch.equal(blocks_computed.all(3), blocks_computed.any(3))  # whole blocks only
    per_step = blocks_computed.any(3)  # (steps, B, blocks)
    current = per_step.float().cumsum(2).argmax(2)  # the last block a step computes: the current one
    for row in range(len(prompts)):
        real_blocks = layout.real[row].view(-1, block).any(1)
        for b in range(T // block):
            if not real_blocks[b]:
                assert not per_step[:, row, b].any()
                continue
            steps_after = per_step[:, row, b] & (current[:, row] > b)
            assert int(steps_after.sum()) <= 1, (row, b)  # written once when final, then read only
            assert not (per_step[:, row, b] & (current[:, row] < b)).any()  # never before its turn


def test_layout_aligns_blocks():
    prompts = [[1] * 5, [2] * 9, [3] * 12]
    layout = lay_out(prompts, 6, MASK_ID, 0, "cpu", 4)
    assert layout.region_start == 12  # the longest prompt's 3 whole blocks
    assert layout.response_start.tolist() == [13, 13, 12]
    assert layout.x.shape[1] == 12 + 8  # ceil((1 + 6) / 4) blocks of 4 after it
    assert layout.real.sum(1).tolist() == [12, 16, 20]  # padding: 2 whole blocks, 1, none
    positions = layout.real.long().cumsum(1) - 1
    for row, start in enumerate(layout.response_start.tolist()):
        assert int(positions[row, start]) == len(prompts[row])  # the response continues the prompt
        assert int(positions[row, 12]) % 4 == 0  # the region starts on a block boundary of every row


def test_stop_at_eos_keeps_the_answer(nets):
    net = nets["llada"]
    eos = net.args.eos_token_id
    with torch.no_grad():  # make EOS likely so that rows stop
        net = tiny_net(tiny_args("llada", block_causal=True), seed=7, logit_scale=4.0, silent_ids=(MASK_ID,))
        net.output.weight[eos] *= 3.0
    prompts = random_prompts([5, 9], seed=6)
    decoder = dict(block_length=4, steps=4, threshold=0.5)
    full = generate(net, prompts, build_decoder("block_diffusion", **decoder), build_cache("prefix"), 24)
    short = generate(net, prompts, build_decoder("block_diffusion", **decoder), build_cache("prefix"), 24,
                     stop_at_eos=True)
    assert short.nfe <= full.nfe
    for a, b in zip(full.tokens.tolist(), short.tokens.tolist()):
        first = a.index(eos) if eos in a else len(a)
        assert b[: first + 1] == a[: first + 1]
        assert all(t == eos for t in b[first:])


def block_refreshes(net, prompts, block_refresh):
    """Tokens of ``cache=dual`` under ``block_refresh``, and for each forward after a block's first
    one the rows that recomputed their whole block (one bool per batch row) and those with something
    to predict."""
    cache = build_cache("dual", block_refresh=block_refresh)
    seen, select = [], cache.select_in_block

    def spy(view):
        request = select(view)
        lo, hi = view.plan.window
        outside_window = request.refresh.clone()
        outside_window[:, lo:hi] = False
        seen.append((outside_window.any(1), request.predict.any(1)))
        return request

    cache.select_in_block = spy
    decoder = build_decoder("fast_dllm_v2", block_length=8, sub_block_length=2, threshold=0.9)
    return generate(net, prompts, decoder, cache, GEN).tokens, seen


def test_dual_block_refresh_batch_is_the_authors_batch_wide_decision(nets):
    """Fast-dLLM v2's block cache recomputes every row's block when any row's sub-block starts
    masked (``block_refresh=batch``); ``row`` decides per row, so a row decodes as it does alone."""
    net, prompts = nets["dream"], random_prompts([8, 8, 8], seed=11)
    _, batch_steps = block_refreshes(net, prompts, "batch")
    row_tokens, row_steps = block_refreshes(net, prompts, "row")
    for whole, predicting in batch_steps:  # all predicting rows recompute their block, or none does
        assert bool(whole[predicting].all()) or not bool(whole.any()), (whole, predicting)
    assert any(whole[predicting].any() and not whole[predicting].all() for whole, predicting in row_steps)
    for row, prompt in enumerate(prompts):
        alone, _ = block_refreshes(net, [prompt], "row")
        assert row_tokens[row].tolist() == alone[0].tolist()
        assert block_refreshes(net, [prompt], "batch")[0][0].tolist() == alone[0].tolist()  # batch 1: the same


def test_refusals(nets):
    block_net, bidirectional = nets["llada"], tiny_net(tiny_args("llada"))
    prompts = random_prompts([4])
    with pytest.raises(ValueError, match=r"decoding='low_confidence' cannot decode a block-diffusion.*block_diffusion"):
        generate(block_net, prompts, build_decoder("low_confidence", steps=8, block_length=4), build_cache("none"), 8)
    with pytest.raises(ValueError, match=r"decoding='block_diffusion' cannot decode a bidirectional.*low_confidence"):
        generate(bidirectional, prompts, build_decoder("block_diffusion"), build_cache("none"), 8)
    with pytest.raises(ValueError, match=r"cache='d2cache' does not run on block-diffusion.*'dual'.*'none'.*'prefix'"):
        generate(block_net, prompts, build_decoder("block_diffusion"), build_cache("d2cache"), 8)
    with pytest.raises(ValueError, match="refresh_interval"):
        generate(block_net, prompts, build_decoder("block_diffusion"), build_cache("prefix", refresh_interval=2), 8)
    with pytest.raises(ValueError, match=r"block_refresh='batch' is for block-diffusion.*allowed: row"):
        generate(bidirectional, prompts, build_decoder("low_confidence", steps=8, block_length=4),
                 build_cache("dual", block_refresh="batch"), 8)
    with pytest.raises(ValueError, match=r"cache.block_refresh='block' \(allowed: \['row', 'batch'\]\)"):
        build_cache("dual", block_refresh="block")
    with pytest.raises(ValueError, match="fast_dllm_v2 .*j - 1"):
        generate(block_net, prompts, build_decoder("fast_dllm_v2"), build_cache("prefix"), 8)
    with pytest.raises(ValueError, match=r"steps=8 \(per block\) exceeds block_length=4"):
        build_decoder("block_diffusion", block_length=4, steps=8)
    with pytest.raises(ValueError, match="sub_block_length=3"):
        build_decoder("fast_dllm_v2", block_length=8, sub_block_length=3)
    with pytest.raises(ValueError, match="remasking='greedy'"):
        build_decoder("block_diffusion", remasking="greedy")
    with pytest.raises(ValueError, match="top_k"):
        build_decoder("block_diffusion", top_k=5)  # greedy: a filter would not apply


def test_sampling_is_seeded_and_filtered(nets):
    net, prompts = nets["llada"], random_prompts([5, 7], seed=8)

    def run(seed, **params):
        decoder = build_decoder("block_diffusion", block_length=4, steps=4, temperature=1.0, **params)
        return generate(net, prompts, decoder, build_cache("prefix"), GEN,
                        generator=torch.Generator().manual_seed(seed)).tokens

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # top-1 sampling: every confidence is 1 > threshold, so each block is committed in one step (the
    # "greedy" of SDAR's generate.py; decoding.temperature=0 is the greedy with real confidences)
    one_step = generate(net, prompts, build_decoder("block_diffusion", block_length=4, steps=4, temperature=1.0,
                                                    top_k=1), build_cache("prefix"), GEN)
    assert one_step.nfe == 4  # (1 or 3 prompt tokens + 13) over blocks of 4: 4 blocks


def test_tie_break_block_takes_what_torch_topk_takes_on_the_block():
    """tie_break=block: per row, torch.topk over the block's float32 confidences, as SDAR's and
    LLaDA2.0's code takes the k most confident (its order among exact ties: top-1 sampling makes every
    confidence 1); the default takes one topk over the row. Token for token with SDAR's generate.py
    and OpenCompass harness on the tiny models this way (README)."""
    from dllm.decoding.base import StepPlan

    lo, hi = 6, 14
    score = torch.full((3, 20), float("-inf"), dtype=torch.float64)
    score[0, lo:hi] = 1.0  # every one tied
    score[1, lo:hi] = torch.tensor([0.5, 0.9, 0.9, 0.9, 0.2, 0.9, 0.9, 0.1], dtype=torch.float64)
    score[2, lo:hi] = torch.tensor([0.3, 0.3, float("-inf"), 0.3, 0.3, 0.7, float("-inf"), 0.3], dtype=torch.float64)
    plan = StepPlan((lo, hi), torch.tensor([3, 2, 4]), 0, 0)
    picks = {}
    for tie_break in ("row", "block"):
        decoder = build_decoder("block_diffusion", block_length=8, steps=2, remasking="static", tie_break=tie_break)
        picks[tie_break] = decoder.select(score, plan)
    for row, count in enumerate(plan.n_transfer.tolist()):
        expected = sorted((lo + torch.topk(score[row, lo:hi].float(), count).indices).tolist())
        assert picks["block"][row].nonzero()[:, 0].tolist() == expected
        assert picks["row"][row].sum() == count
    assert not torch.equal(picks["row"], picks["block"])
    with pytest.raises(ValueError, match=r"decoding.tie_break='first' \(allowed: \['row', 'block'\]\)"):
        build_decoder("block_diffusion", tie_break="first")
