"""dLLM-Cache: exact at refresh 1, per-layer update counts, padding masked (batch == one by one)."""
from __future__ import annotations

import math

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.cache.dllm_cache import FeatureReuse
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate

from conftest import MASK_ID, random_prompts, tiny_args, tiny_net, with_weights

GEN = 16


def low_confidence():
    return build_decoder("low_confidence", steps=GEN, block_length=8)


@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_refresh_every_step_reproduces_none(family, weights, lengths):
    net = with_weights(tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,)), weights)
    prompts = random_prompts(lengths)
    base = generate(net, prompts, low_confidence(), build_cache("none"), GEN)
    forced = generate(net, prompts, low_confidence(), build_cache("dllm_cache", prompt_interval=1, response_interval=1), GEN)
    assert torch.equal(forced.tokens, base.tokens)
    assert forced.recompute_ratio == 1.0


def test_padding_is_masked_batch_equals_one_by_one(family, weights):
    """The reference never masks padding; here a padded row decodes exactly as it does alone."""
    net = with_weights(tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,)), weights)
    prompts = random_prompts((7, 3, 10))
    method = lambda: build_cache("dllm_cache", prompt_interval=8, response_interval=4)  # noqa: E731
    batch = generate(net, prompts, low_confidence(), method(), GEN)
    alone = torch.cat([generate(net, [p], low_confidence(), method(), GEN).tokens for p in prompts])
    assert torch.equal(batch.tokens, alone)


class CountingHook(FeatureReuse):
    per_layer: list[list[int]] = []

    def pick(self, layer, block, x_norm):
        picked, valid, value = super().pick(layer, block, x_norm)
        CountingHook.per_layer.append([self.refresh_prompt, self.refresh_response, layer, int(valid.sum())])
        return picked, valid, value


def test_rows_recomputed_per_layer_follow_the_intervals(monkeypatch):
    """Prompt 10, gen 16, Kp=8, Kr=4, rho=0.25: full at 0 and 8, response-only at 4 and 12,
    otherwise ceil(0.25 x 16) = 4 response rows per layer (the prompt never)."""
    import dllm.cache.dllm_cache as module

    monkeypatch.setattr(module, "FeatureReuse", CountingHook)
    CountingHook.per_layer = []
    net = tiny_net(tiny_args("llada"), logit_scale=8.0, silent_ids=(MASK_ID,))
    out = generate(net, random_prompts((10,)), low_confidence(),
                   build_cache("dllm_cache", prompt_interval=8, response_interval=4, update_ratio=0.25), GEN)
    a = net.args
    L = a.n_layers
    # Rows not recomputed still get their value projection: wv's share of the block's linear weights.
    kv_width = a.n_kv_heads * a.head_dim
    value_share = a.dim * kv_width / (2 * a.dim * a.dim + 2 * a.dim * kv_width + 3 * a.dim * a.ffn_dim)
    expected, value_only = [], 0
    for step in range(GEN):
        prompt, response = step % 8 == 0, step % 4 == 0
        count = (10 if prompt else 0) + (16 if response else math.ceil(0.25 * 16))
        expected += [[prompt, response, layer, count] for layer in range(L)]
        value_only += 0 if response else L * (16 - count)
    assert CountingHook.per_layer == expected
    assert out.active_token_layers == pytest.approx(sum(row[3] for row in expected) + value_only * value_share)


def test_bad_settings():
    with pytest.raises(ValueError, match="prompt_interval=0"):
        build_cache("dllm_cache", prompt_interval=0)
    with pytest.raises(ValueError, match="update_ratio=1.5"):
        build_cache("dllm_cache", update_ratio=1.5)
