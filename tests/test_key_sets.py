"""Cache methods that choose keys (ActiveRequest.keys): the gathered attention equals a masked
one, keeping every key reproduces cache=none, attention statistics land on positions, and the
attention / FLOP / KV-size accounting."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dllm.cache.base import ActiveRequest, CacheMethod, StepView, build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate
from dllm.metrics.accounting import attention_pair_flops, kv_bytes_per_token, token_layer_flops
from dllm.models.transformer import KVStore, SelectedKeys, rope_cos_sin

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EOS_ID, MASK_ID, PAD_ID, random_prompts, tiny_args, tiny_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["llada", "dream"])
def net(request):
    return tiny_net(tiny_args(request.param, max_seq_len=64), seed=3, logit_scale=3.0, silent_ids=(MASK_ID, PAD_ID, EOS_ID))


class Keys(CacheMethod):
    """Every position recomputed every step; attention restricted by ``choose(view)``."""

    name = "keys"

    def __init__(self, choose, needs_attention: bool = False) -> None:
        self.choose, self.needs_attention, self.seen = choose, needs_attention, []

    def select(self, view: StepView) -> ActiveRequest:
        everything = torch.ones_like(view.masked)
        return ActiveRequest(predict=everything, refresh=everything, keys=self.choose(view))

    def observe(self, view, outcome) -> None:
        self.seen.append(outcome)


def test_gathered_keys_equal_masked_attention(net):
    """Attention over the gathered selected keys computes what a mask over every key does."""
    torch.manual_seed(0)
    B, T = 2, 12
    tokens = torch.randint(0, 60, (B, T))
    positions = torch.arange(T).expand(B, T)
    chosen = torch.rand(B, T) < 0.5
    chosen[:, 0] = True
    per_layer = [chosen, chosen | (torch.rand(B, T) < 0.5)]
    trash = torch.zeros(B, 1, dtype=torch.bool)
    masked_store = KVStore(net.args, B, T, torch.device("cpu"), net.dtype)
    expected, _ = net.hidden(tokens, positions, torch.cat([chosen, trash], 1)[:, None, None, :], masked_store, None)
    index = [torch.where(k, torch.arange(T), T).sort(1).values[:, : int(k.sum(1).max())] for k in per_layer]
    valid = [i < T for i in index]
    store = KVStore(net.args, B, T, torch.device("cpu"), net.dtype)
    same = SelectedKeys(store, [index[0]] * 2, [valid[0]] * 2)
    got, _ = net.hidden(tokens, positions, None, same, None)
    assert torch.allclose(got, expected, atol=1e-5)
    # one selection per layer: as an explicit run of the blocks with each layer's mask
    mixed = SelectedKeys(KVStore(net.args, B, T, torch.device("cpu"), net.dtype), index, valid)
    got_mixed, _ = net.hidden(tokens, positions, None, mixed, None)
    h = net.tok_embeddings(tokens)
    cos, sin = rope_cos_sin(positions, net.args.head_dim, net.args.rope_theta, net.dtype)
    for layer, block in enumerate(net.layers):
        h, _ = block(h, cos, sin, per_layer[layer][:, None, None, :], None, layer, None, False)
    assert torch.allclose(got_mixed, net.norm(h), atol=1e-5)
    assert not torch.allclose(got_mixed, got, atol=1e-3)


def test_every_key_kept_reproduces_none(net):
    prompts = random_prompts([7, 4, 10], seed=3)
    decoder = dict(steps=16, block_length=8)
    ref = generate(net, prompts, build_decoder("low_confidence", **decoder), build_cache("none"), 16)
    out = generate(net, prompts, build_decoder("low_confidence", **decoder), Keys(lambda v: torch.ones_like(v.masked)), 16)
    assert torch.equal(out.tokens, ref.tokens)
    # none computes the padding rows too (full forwards); the key method only the real rows
    real = torch.tensor([7 + 16, 4 + 16, 10 + 16], dtype=torch.float64)
    assert ref.attention_pairs == pytest.approx(16 * net.args.n_layers * 26 * float(real.sum()))
    assert out.attention_pairs == pytest.approx(16 * net.args.n_layers * float((real * real).sum()))
    assert out.peak_kv_gb == pytest.approx(ref.peak_kv_gb)


def test_dropping_keys_changes_tokens_and_is_counted(net):
    prompts = random_prompts([7, 4, 10], seed=3)
    decoder = dict(steps=16, block_length=8)

    def no_far_suffix(view):  # everything up to the end of the current block
        keys = torch.zeros_like(view.masked)
        keys[:, : view.plan.window[1]] = True
        return keys

    ref = generate(net, prompts, build_decoder("low_confidence", **decoder), build_cache("none"), 16)
    out = generate(net, prompts, build_decoder("low_confidence", **decoder), Keys(no_far_suffix), 16)
    assert not (out.tokens == MASK_ID).any()
    assert out.attention_pairs < ref.attention_pairs and out.total_attention_pairs == ref.total_attention_pairs
    assert out.flops < ref.flops == pytest.approx(ref.total_flops)
    # by hand: prompt width 10, T = 26; every real row recomputed every step attends to the real
    # keys before the block end: 8 steps with the first block [10, 18), 8 with the second [18, 26)
    args = net.args
    real = [7 + 16, 4 + 16, 10 + 16]  # real rows (and keys when nothing is dropped)
    pads = [3, 6, 0]
    first = sum(r * (18 - p) for r, p in zip(real, pads))  # queries x real keys before position 18
    second = sum(r * r for r in real)
    assert out.attention_pairs == pytest.approx(args.n_layers * (8 * first + 8 * second))
    assert out.peak_kv_gb == pytest.approx(sum(real) * kv_bytes_per_token(args, 4) / 2**30)
    linear = 16 * sum(real) * args.n_layers * token_layer_flops(args)
    assert out.flops == pytest.approx(linear + out.attention_pairs * attention_pair_flops(args))


def test_attention_statistics_land_on_the_selected_positions(net):
    prompts = random_prompts([7, 4], seed=3)

    def even(view):
        keys = torch.zeros_like(view.masked)
        keys[:, ::2] = True
        return keys

    method = Keys(even, needs_attention=True)
    generate(net, prompts, build_decoder("low_confidence", steps=4, block_length=8), method, 8)
    for outcome in method.seen:
        for layer in outcome.attention:
            assert layer[..., 1::2][..., :-1].abs().max() == 0  # odd positions (and trash) get nothing
            valid = outcome.rows_valid
            assert torch.allclose(layer.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5)


def test_a_row_without_keys_is_refused(net):
    with pytest.raises(ValueError, match="no key to attend to"):
        generate(net, random_prompts([5], seed=1), build_decoder("low_confidence", steps=4, block_length=8),
                 Keys(lambda v: torch.zeros_like(v.masked)), 8)


def test_per_layer_key_sets_must_match_the_layers(net):
    with pytest.raises(ValueError, match="key sets for 1 layers"):
        generate(net, random_prompts([5], seed=1), build_decoder("low_confidence", steps=4, block_length=8),
                 Keys(lambda v: [torch.ones_like(v.masked)]), 8)
