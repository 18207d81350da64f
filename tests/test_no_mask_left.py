"""The loop's invariant: a generation never ends with [MASK] in the response, for every cache
method x every decoder it accepts.

Runs on the committed trained tiny checkpoints (assets/; their confident, position-dependent
predictions are what exposed d²Cache's stage 1 picking masked positions outside a block decoder's
window) with a left-padded batch of arith prompts in the chat format: a short generation with
odd block lengths and small hyperparameters, and a long one with the paper defaults.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import IncompleteDecoding, generate
from dllm.eval.arith_data import load_test, prompt_text
from dllm.models.loading import load_model
from dllm.models.tokenization import encode_prompts, load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# (gen_length, block_length) of the two regimes: odd blocks in the short one.
SHORT, LONG = (21, 7), (128, 32)
CACHES = {
    "short": [
        ("none", {}), ("dkv_decode", dict(refresh_interval=2)), ("dkv_decode", dict(refresh_interval=3, variant="pd")),
        ("dkv_decode", dict(variant="prefill")), ("dkv_greedy", dict(refresh_interval=3, window=0)),
        ("dkv_greedy", dict(refresh_interval=2, window=1)), ("d2cache", dict(k=1, p=0.01)),
        ("d2cache", dict(k=2, p=0.5, density="fraction")), ("prefix", {}), ("dual", {}),
        ("dual", dict(refresh_interval=3)), ("dllm_cache", dict(prompt_interval=5, response_interval=3, update_ratio=0.0)),
        ("dllm_cache", dict(prompt_interval=2, response_interval=4, update_ratio=0.5)),
        # the reference-rule options
        ("dkv_decode", dict(refresh_interval=3, shift_rule="un")), ("dkv_decode", dict(shift_rule="right", variant="pd")),
        ("d2cache", dict(k=1, reference_rules=True)), ("prefix", dict(dream_rows="reference")),
        ("dual", dict(dream_rows="reference")),
        ("dllm_cache", dict(prompt_interval=5, response_interval=3, value_write="recomputed", refresh_first_layer=False)),
        # the methods that choose keys
        ("elastic", dict(gamma=0.5, window=1)), ("elastic", dict(gamma=0.9, window=3)),
        ("sparse_dllm", dict(keep_ratio=0.2)), ("sparse_dllm", dict(score="mean_query", delay=0)),
        ("streaming", dict(window=0, tail=False)), ("streaming", dict(window=3, base="dual")),
        ("dpad", dict(window=6)), ("dpad", dict(window=4, base="dual")),
    ],
    "long": [
        ("none", {}), ("dkv_decode", {}), ("dkv_greedy", {}), ("d2cache", {}), ("d2cache", dict(k=1)),
        ("prefix", {}), ("dual", {}), ("dllm_cache", {}), ("elastic", {}), ("sparse_dllm", {}), ("streaming", {}),
        ("dpad", {}),
    ],
}


def decoders(regime: str) -> list[tuple[str, dict]]:
    """Every decoder; the short regime also with several tokens per step (an uneven split)."""
    gen_length, block = SHORT if regime == "short" else LONG
    few = 3 * (gen_length // block)  # three steps per block
    out = [("low_confidence", dict(steps=gen_length, block_length=block)), ("low_confidence", dict(steps=few, block_length=block)),
           ("random", dict(steps=gen_length, block_length=block)), ("threshold", dict(block_length=block)),
           ("certainty_prior", dict(steps=few, sigma=3.0)), ("dream", dict(steps=few, alg="entropy"))]
    if regime == "short":
        out += [("random", dict(steps=few, block_length=block)), ("threshold", dict(block_length=block, threshold=1.0)),
                ("certainty_prior", dict(steps=gen_length, sigma=3.0)), ("dream", dict(steps=gen_length, alg="maskgit_plus")),
                ("dream", dict(steps=gen_length, alg="topk_margin")), ("dream", dict(steps=few, alg="origin")),
                ("dream", dict(steps=few, alg="entropy", block_length=block)),
                ("dream", dict(steps=gen_length, alg="maskgit_plus", block_length=block, first_token="commit")),
                ("dream", dict(steps=few, alg="maskgit_plus", alg_temp=0.5)),
                ("ar", dict(steps=gen_length, block_length=block)), ("eb_sampler", dict(block_length=block)),
                ("eb_sampler", dict(gamma=0.5, error_proxy="confidence")), ("pc_sampler", dict(steps=few, block_length=block)),
                ("prophet", dict(steps=gen_length, block_length=block)), ("prophet", dict(steps=few, window="block", block_length=block)),
                ("klass", dict(steps=gen_length, block_length=block)), ("klass", dict(steps=few, block_length=block, window="block")),
                ("wino", dict(block_length=block, threshold=0.3)), ("entropy_threshold", dict(block_length=block))]
    out.append(("wino", dict(block_length=block)))
    return out


@pytest.fixture(scope="module", params=["llada", "dream"])
def tiny(request):
    folder = ASSETS / f"tiny_{request.param}"
    tokenizer = load_tokenizer(folder)
    questions = [prompt_text(doc["question"]) for doc in load_test()[:3]]
    prompts = encode_prompts(tokenizer, questions, chat=True)
    prompts[1] = prompts[1][5:]  # a shorter row: the batch is left-padded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(folder), prompts
    torch.set_num_threads(threads)


@pytest.mark.parametrize("regime", ["short", "long"])
def test_no_mask_left_for_any_accepted_combination(tiny, regime):
    net, prompts = tiny
    gen_length, block = SHORT if regime == "short" else LONG
    ran = 0
    for cache_name, cache_params in CACHES[regime]:
        for decoder_name, decoder_params in decoders(regime):
            decoder, cache = build_decoder(decoder_name, **decoder_params), build_cache(cache_name, **cache_params)
            try:
                cache.check(decoder)
                cache.check_model(net.args.logit_shift)
                decoder.check_model(net.args.logit_shift)
            except ValueError:
                continue  # refused by name before generating
            out = generate(net, prompts, decoder, cache, gen_length, generator=torch.Generator().manual_seed(0))
            left = int((out.tokens == net.args.mask_token_id).sum())
            assert left == 0, f"{cache_name}{cache_params} x {decoder_name}{decoder_params}: {left} [MASK] left"
            ran += 1
    assert ran >= {"short": 200, "long": 30}[regime]


def test_d2cache_under_a_block_decoder_leaves_no_mask(tiny):
    """The reproduction of the report: gen 128, one token per step, blocks of 32, k = 32 and 4."""
    net, prompts = tiny
    for k in (32, 4):
        for prompt in prompts:
            decoder = build_decoder("low_confidence", steps=128, block_length=32)
            out = generate(net, [prompt], decoder, build_cache("d2cache", k=k), 128)
            assert not (out.tokens == net.args.mask_token_id).any()


class StageOneOutsideTheWindow:
    """A cache method that, after a full first step, predicts only the response's last position:
    the same defect as the old d²Cache stage 1 under a block decoder."""

    name = "last_only"
    needs_attention = False

    def check(self, decoder) -> None: ...

    def check_attention(self, block_causal: bool) -> None: ...

    def start(self, ctx) -> None:
        self.ctx = ctx

    def select(self, view):
        from dllm.cache.base import ActiveRequest

        if view.step == 0:
            return ActiveRequest.everything()
        predict = torch.zeros_like(view.masked)
        predict[:, -1] = True
        return ActiveRequest(predict=predict)

    def observe(self, view, outcome) -> None: ...


def test_the_loop_refuses_a_step_that_cannot_commit_its_schedule(tiny):
    net, prompts = tiny
    decoder = build_decoder("low_confidence", steps=16, block_length=8)
    with pytest.raises(IncompleteDecoding, match=r"step 1: decoding='low_confidence' must commit 1 token.*cache='last_only'"):
        generate(net, prompts, decoder, StageOneOutsideTheWindow(), 16)
