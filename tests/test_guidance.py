"""decoding.cfg_scale: LLaDA's classifier-free guidance, against an independent reading of LLaDA's
generate() (batch 1, low-confidence remasking in blocks, plain full forwards)."""
from __future__ import annotations

import pytest
import torch

from conftest import EOS_ID, MASK_ID, PAD_ID, compose, random_prompts, tiny_args, tiny_net, trained_tiny
from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def llada_generate_with_cfg(net, prompt, gen_length, steps, block_length, cfg_scale, mask_id=MASK_ID,
                            dtype=torch.float64):
    """LLaDA's generate(): the unconditional copy masks the prompt; guided logits
    u + (s + 1)(c - u); per block, steps split evenly, n // steps tokens per step (the remainder to the
    first steps), the most probable (softmax of the guided logits, in ``dtype``: float64 before LLaDA's
    commit f51cb17, the logits' float32 since) masked positions of the block committed, [MASK] never chosen."""
    x = torch.tensor([prompt + [mask_id] * gen_length])
    P = len(prompt)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for block in range(n_blocks):
        lo, hi = P + block * block_length, P + (block + 1) * block_length
        n = int((x[0, lo:hi] == mask_id).sum())
        counts = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for count in counts:
            unconditional = x.clone()
            unconditional[0, :P] = mask_id
            cond, uncond = net(x).to(dtype), net(unconditional).to(dtype)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
            choosable = logits.clone()
            choosable[..., mask_id] = float("-inf")
            tokens = choosable.argmax(-1)
            confidence = torch.softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
            eligible = torch.zeros_like(x, dtype=torch.bool)
            eligible[0, lo:hi] = x[0, lo:hi] == mask_id
            confidence = confidence.masked_fill(~eligible, float("-inf"))
            chosen = confidence[0].topk(count).indices
            x[0, chosen] = tokens[0, chosen]
    return x[0, P:].tolist()


@pytest.mark.parametrize("cfg_scale", [0.5, 2.0])
def test_guided_tokens_equal_llada_generate(cfg_scale):
    net = tiny_net(tiny_args("llada", max_seq_len=64), seed=4, logit_scale=3.0, silent_ids=(PAD_ID, EOS_ID))
    for prompt in random_prompts([6, 9], seed=8):
        ours = generate(net, [prompt], build_decoder("low_confidence", steps=8, block_length=8), build_cache("none"), 16,
                        cfg_scale=cfg_scale)
        assert ours.tokens[0].tolist() == llada_generate_with_cfg(net, prompt, 16, 8, 8, cfg_scale)
        plain = generate(net, [prompt], build_decoder("low_confidence", steps=8, block_length=8), build_cache("none"), 16)
        assert ours.recompute_ratio == 1.0 and ours.active_token_layers == 2 * plain.active_token_layers


def test_confidence_in_the_logits_dtype_equals_llada_generate_now():
    """decoding.confidence_dtype=logits: LLaDA's generate() since f51cb17, whose float32 softmax rounds
    guided confidences near 1 to equal values; on the trained tiny LLaDA that changes tokens, which the
    float64 default then does not reproduce."""
    net, prompts = trained_tiny("llada")
    mask = net.args.mask_token_id
    differs = 0
    for gen, block, steps, cfg_scale in ((32, 8, 16, 1.0), (24, 8, 9, 0.5), (32, 32, 7, 2.0)):
        for prompt in prompts:
            now = llada_generate_with_cfg(net, prompt, gen, steps, block, cfg_scale, mask, torch.float32)
            run = {dtype: generate(net, [prompt], build_decoder("low_confidence", steps=steps, block_length=block,
                                                              confidence_dtype=dtype),
                                   build_cache("none"), gen, cfg_scale=cfg_scale).tokens[0].tolist()
                   for dtype in ("logits", "float64")}
            assert run["logits"] == now
            assert run["float64"] == llada_generate_with_cfg(net, prompt, gen, steps, block, cfg_scale, mask)
            differs += run["float64"] != now
    assert differs
    with pytest.raises(ValueError, match=r"confidence_dtype='float32' \(allowed: \['float64', 'logits'\]\)"):
        build_decoder("low_confidence", steps=8, confidence_dtype="float32")


def test_guidance_changes_the_result_and_zero_is_off():
    net = tiny_net(tiny_args("llada", max_seq_len=64), seed=4, logit_scale=3.0, silent_ids=(PAD_ID, EOS_ID))
    prompts = random_prompts([6, 9, 4], seed=8)  # a left-padded batch
    run = lambda s: generate(net, prompts, build_decoder("low_confidence", steps=8, block_length=8),  # noqa: E731
                             build_cache("none"), 16, cfg_scale=s).tokens
    assert torch.equal(run(0.0), generate(net, prompts, build_decoder("low_confidence", steps=8, block_length=8),
                                          build_cache("none"), 16).tokens)
    assert not torch.equal(run(0.0), run(3.0))


def test_guidance_needs_full_forwards_and_a_number():
    from dllm.pipeline import plan_run

    assert plan_run(compose("decoding.cfg_scale=1.5")).cfg_scale == 1.5
    with pytest.raises(ValueError, match=r"decoding.cfg_scale=1.5 needs a full forward every step; cache='dual'"):
        plan_run(compose("decoding.cfg_scale=1.5", "cache=dual"))
    with pytest.raises(ValueError, match=r"decoding.cfg_scale=-1.0 must be a number in \[0, 10000\]"):
        plan_run(compose("decoding.cfg_scale=-1.0"))
