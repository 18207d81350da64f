"""The shared Transformer: parity with transformers (causal), a float64 reference (bidirectional),
the active-subset path over a KVStore, and Dream's logit shift."""
from __future__ import annotations

import re

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate, pack
from dllm.models import dream, llada
from dllm.models.packed import PackedLinear, pack_linear_weights
from dllm.models.transformer import KVStore

from conftest import assert_causal_matches, float64_reference, left_padded, with_weights

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- HF parity (causal)

# LLaDA checkpoint key -> transformers Llama key (checkpoint keys come from llada.key_pairs).
LLADA_TO_HF_LLAMA = [
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.(q_proj|k_proj|v_proj)\.weight$", r"model.layers.\1.self_attn.\2.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
]


def llada_to_hf_key(key: str) -> str:
    for pattern, repl in LLADA_TO_HF_LLAMA:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise KeyError(key)


def hf_model(net):
    """The equivalent transformers model, its weights taken through the family's checkpoint key map."""
    a = net.args
    common = dict(
        vocab_size=a.vocab_size,
        hidden_size=a.dim,
        intermediate_size=a.ffn_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta,
        max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_act="silu",
    )
    state = net.state_dict()
    if a.family == "llada":
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        cls = transformers.LlamaForCausalLM
        hf_state = {llada_to_hf_key(ck): state[nk] for ck, nk in llada.key_pairs(a)}
    else:
        config = transformers.Qwen2Config(use_sliding_window=False, **common)
        cls = transformers.Qwen2ForCausalLM
        hf_state = {ck: state[nk] for ck, nk in dream.key_pairs(a)}  # Dream's keys are Qwen2's
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary_emb" not in k], missing
    return model


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_causal_matches_transformers(family, n_kv_heads, make_args, make_net, make_prompts):
    net = make_net(make_args(family, n_kv_heads=n_kv_heads), seed=1)
    hf = hf_model(net)
    tokens = torch.tensor(make_prompts([11, 11], seed=3))
    with torch.no_grad():
        ours = net(tokens, causal=True)
        theirs = hf(input_ids=tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_causal_left_padded_matches_transformers(family, make_args, make_net, make_prompts):
    net = make_net(make_args(family), seed=2)
    assert_causal_matches(net, hf_model(net), make_prompts([9, 5, 7], seed=4))


# --------------------------------------------------------------------------- float64 reference (bidirectional)


@pytest.mark.parametrize("n_kv_heads", [4, 1], ids=["mha", "mqa"])
def test_bidirectional_matches_float64_reference(family, n_kv_heads, make_args, make_net, make_prompts):
    net = make_net(make_args(family, n_kv_heads=n_kv_heads, n_layers=3), seed=5)
    tokens, mask = left_padded(make_prompts([10, 4, 7], seed=6), net.args.pad_token_id)
    expected = float64_reference(net, tokens, mask)
    real = mask.bool()
    ours = net(tokens, attention_mask=mask)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours[real].double(), expected[real], atol=1e-4, rtol=1e-4)
    ours64 = net.to(torch.float64)(tokens, attention_mask=mask)  # RoPE/RMSNorm run in float32 inside
    torch.testing.assert_close(ours64[real], expected[real], atol=1e-5, rtol=1e-5)


def test_bidirectional_is_not_causal(family, make_args, make_net, make_prompts):
    """Changing the last token changes the first position's logits (and does not in causal mode)."""
    net = make_net(make_args(family), seed=7)
    tokens = torch.tensor(make_prompts([8], seed=8))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 60
    assert not torch.allclose(net(tokens)[0, 0], net(changed)[0, 0])
    torch.testing.assert_close(net(tokens, causal=True)[0, :-1], net(changed, causal=True)[0, :-1])


def test_left_padding_does_not_change_a_row(family, make_args, make_net, make_prompts):
    net = make_net(make_args(family), seed=9)
    prompts = make_prompts([9, 4], seed=10)
    tokens, mask = left_padded(prompts, net.args.pad_token_id)
    batched = net(tokens, attention_mask=mask)
    alone = net(torch.tensor([prompts[1]]))
    torch.testing.assert_close(batched[1, -4:], alone[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- active subset over a KVStore


def loop_inputs(tokens: torch.Tensor, real: torch.Tensor, mask_id: int):
    """The loop's layout: tokens/positions with the trash column T appended, key mask hiding it."""
    B, T = tokens.shape
    x = torch.cat([tokens, torch.full((B, 1), mask_id)], 1)
    positions = torch.cat([(real.long().cumsum(1) - 1).clamp(min=0), torch.zeros(B, 1, dtype=torch.long)], 1)
    key_mask = torch.cat([real, torch.zeros(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
    return x, positions, key_mask


def filled_store(net, tokens, real):
    B, T = tokens.shape
    x, positions, key_mask = loop_inputs(tokens, real, net.args.mask_token_id)
    store = KVStore(net.args, B, T, "cpu", torch.float32)
    full, _ = net.hidden(x[:, :T], positions[:, :T], key_mask, store, None)
    return store, full, x, positions, key_mask


def test_store_forward_equals_plain_forward(family, make_args, make_net, make_prompts):
    net = make_net(make_args(family), seed=11)
    tokens, mask = left_padded(make_prompts([12, 8, 10], seed=12), net.args.pad_token_id)
    real = mask.bool()
    _, full, *_ = filled_store(net, tokens, real)
    plain, _ = net.hidden(tokens, (mask.cumsum(1) - 1).clamp(min=0), real[:, None, None, :])
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.output(full)[real], net(tokens, attention_mask=mask)[real], atol=1e-5, rtol=1e-5)


def test_active_subset_equals_full_forward(family, make_args, make_net, make_prompts):
    net = make_net(make_args(family), seed=13)
    B, T, A = 3, 14, 5
    tokens = torch.tensor(make_prompts([T] * B, seed=14))
    real = torch.ones(B, T, dtype=torch.bool)
    store, full, x, positions, key_mask = filled_store(net, tokens, real)
    kv_before = [k.clone() for k in store.k]
    gen = torch.Generator().manual_seed(15)
    index = torch.stack([torch.randperm(T, generator=gen)[:A] for _ in range(B)])  # unsorted, distinct
    sub, _ = net.hidden(x.gather(1, index), positions.gather(1, index), key_mask, store, index)
    expected = full.gather(1, index[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(sub, expected, atol=1e-5, rtol=1e-5)
    for before, after in zip(kv_before, store.k):  # rewriting with the same tokens changes nothing
        torch.testing.assert_close(after[:, :, :T], before[:, :, :T], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("want_attention", [False, True])
def test_ragged_active_subset_with_trash_slot(family, weights, want_attention, make_args, make_net, make_prompts):
    """Rows with different active counts are padded to slot T (as loop.py does) without mixing."""
    net = with_weights(make_net(make_args(family), seed=16), weights)
    args = net.args
    prompts = make_prompts([13, 9, 11], seed=17)
    tokens, mask = left_padded(prompts, args.pad_token_id)
    real = mask.bool()
    B, T = tokens.shape
    store, full, x, positions, key_mask = filled_store(net, tokens, real)
    kv_before = [(k[:, :, :T].clone(), v[:, :, :T].clone()) for k, v in zip(store.k, store.v)]
    active = torch.zeros(B, T, dtype=torch.bool)
    active[0, [0, 3, 5, 8, 12]] = True  # 5 rows
    active[1, [T - 1]] = True  # 1 row
    active[2, [4, 10]] = True  # 2 rows (row 2 starts at column 2: padding before)
    rows, valid = pack(active)
    assert rows.shape == (B, 5) and valid.sum(1).tolist() == [5, 1, 2]
    rows = rows.masked_fill(~valid, T)
    sub, attention = net.hidden(x.gather(1, rows), positions.gather(1, rows), key_mask, store, rows, want_attention)
    expected = full.gather(1, rows.clamp(max=T - 1)[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(sub[valid], expected[valid], atol=1e-5, rtol=1e-5)
    for (k0, v0), k, v in zip(kv_before, store.k, store.v):  # garbage went to the trash slot only
        torch.testing.assert_close(k[:, :, :T], k0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:, :, :T], v0, atol=1e-5, rtol=1e-5)
    if want_attention:
        assert len(attention) == args.n_layers
        for probs in attention:
            assert probs.shape == (B, 5, T + 1)
            torch.testing.assert_close(probs[valid].sum(-1), torch.ones(int(valid.sum())))
            assert (probs[..., T] == 0).all()  # the trash slot is never attended
            assert (probs[:, :, :T][~real[:, None, :].expand(-1, 5, -1)] == 0).all()  # nor padding


def test_active_rows_read_other_rows_from_the_store(make_args, make_net, make_prompts):
    """One layer: recomputing only the changed positions gives the full forward of the new tokens.

    With a single layer the stored K/V of untouched positions depend only on their own tokens, so
    they stay exact; this checks that active rows see their own fresh K/V and everyone else's stored K/V.
    """
    net = make_net(make_args("llada", n_layers=1), seed=18)
    T = 10
    tokens = torch.tensor(make_prompts([T, T], seed=19))
    real = torch.ones(2, T, dtype=torch.bool)
    store, _, x, positions, key_mask = filled_store(net, tokens, real)
    index = torch.tensor([[2, 7], [0, 9]])
    new = x.clone()
    new.scatter_(1, index, (x.gather(1, index) + 5) % 60)
    sub, _ = net.hidden(new.gather(1, index), positions.gather(1, index), key_mask, store, index)
    reference, _ = net.hidden(new[:, :T], positions[:, :T], real[:, None, None, :])
    torch.testing.assert_close(sub, reference.gather(1, index[..., None].expand(-1, -1, net.args.dim)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Dream's logit shift


def first_step_prediction(net, x: torch.Tensor, P: int, G: int):
    """From one full forward of x (prompt + G masks): the most confident response position and its token."""
    logits = net(x).double()
    logits[..., net.args.mask_token_id] = float("-inf")  # the loop never commits [MASK]
    shift = net.args.logit_shift
    predictions = logits[0, P - shift : P + G - shift]  # row j predicts response position P + j
    probs = predictions.softmax(-1)
    conf, tokens = probs.max(-1)
    j = int(conf.argmax())
    return j, int(tokens[j])


@pytest.mark.parametrize(
    "fam, decoding, params",
    [("llada", "low_confidence", {}), ("dream", "low_confidence", {}), ("dream", "dream", {"alg": "maskgit_plus"})],
)
def test_single_step_uses_shifted_logits(fam, decoding, params, make_args, make_net, make_prompts):
    """steps=1: every response token is the argmax of the full forward at j - shift (shift 1 for Dream)."""
    net = make_net(make_args(fam), seed=20, logit_scale=3.0)
    P, G = 7, 6
    prompt = make_prompts([P], seed=21)[0]
    out = generate(net, [prompt], build_decoder(decoding, steps=1, **params), build_cache("none"), G)
    x = torch.tensor([prompt + [net.args.mask_token_id] * G])
    logits = net(x)
    logits[..., net.args.mask_token_id] = float("-inf")  # the loop never commits [MASK]
    shift = net.args.logit_shift
    expected = logits[0, P - shift : P + G - shift].argmax(-1)
    assert out.tokens[0].tolist() == expected.tolist()
    if shift:
        unshifted = logits[0, P : P + G].argmax(-1)
        assert unshifted.tolist() != expected.tolist()  # the test can tell the two readings apart
        assert int(expected[0]) == int(logits[0, P - 1].argmax())  # first token from the last prompt token


@pytest.mark.parametrize("fam", ["llada", "dream"])
def test_loop_logits_equal_plain_forward(fam, make_args, make_net, make_prompts):
    """The logits a decoder sees in step 0 (cache none, left-padded batch) are the plain forward's,
    read at j - shift for response position j, [MASK] included (its confidences are the full
    softmax, as in LLaDA's and Dream's code; only the token choice excludes [MASK])."""
    net = make_net(make_args(fam), seed=25, logit_scale=3.0)
    args = net.args
    G = 5
    prompts = make_prompts([7, 4], seed=26)
    decoder = build_decoder("low_confidence", steps=1)
    seen = []
    propose = decoder.propose

    def spy(logits, positions=None):
        seen.append(logits.clone())
        return propose(logits, positions)

    decoder.propose = spy
    generate(net, prompts, decoder, build_cache("none"), G)
    tokens, mask = left_padded([p + [args.mask_token_id] * G for p in prompts], args.pad_token_id)
    expected = net(tokens, attention_mask=mask)
    P, shift = 7, args.logit_shift
    expected = expected[:, P - shift : P + G - shift]
    assert len(seen) == 1 and seen[0].shape == expected.shape
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


def test_dream_one_token_per_step_first_commit(make_args, make_net, make_prompts):
    """One token per step: the first committed token is chosen from the full forward's logits at j - 1."""
    net = make_net(make_args("dream"), seed=24, logit_scale=3.0)
    P, G = 6, 5
    prompt = make_prompts([P], seed=0)[0]
    x = torch.tensor([prompt + [net.args.mask_token_id] * G])
    j, token = first_step_prediction(net, x, P, G)
    out = generate(net, [prompt], build_decoder("low_confidence", steps=G), build_cache("none"), G)
    assert int(out.tokens[0, j]) == token
    # The unshifted reading would have committed a different (position, token) first.
    logits = net(x).double()
    logits[..., net.args.mask_token_id] = float("-inf")
    probs = logits[0, P : P + G].softmax(-1)
    conf, tokens = probs.max(-1)
    assert (int(conf.argmax()), int(tokens[conf.argmax()])) != (j, token)

    # gen_length 1: the only response token is predicted by the last prompt token.
    out1 = generate(net, [prompt], build_decoder("dream", steps=1, alg="entropy"), build_cache("none"), 1)
    last = net(torch.tensor([prompt + [net.args.mask_token_id]]))[0, P - 1]
    last[net.args.mask_token_id] = float("-inf")
    assert int(out1.tokens[0, 0]) == int(last.argmax())


def test_inference_forward_equals_the_autograd_forward(family, make_args, make_net, make_prompts):
    """The in-place SwiGLU used without autograd gives the training path's logits bit for bit,
    and the training path still backpropagates."""
    net = make_net(make_args(family), seed=21).requires_grad_(True)
    tokens = torch.tensor(make_prompts([9, 9], seed=22))
    with torch.inference_mode():
        inference = net(tokens)
    training = net(tokens)
    assert torch.equal(inference, training)
    training.sum().backward()
    assert net.layers[0].ffn.w_gate.weight.grad is not None


# ------------------------------------------------------------------ prepacked weights (CPU inference)

@pytest.mark.parametrize("tie", [False, True])
def test_packed_weights_compute_the_dense_forward(family, tie, make_args, make_net, make_prompts):
    """Every linear layer (Dream's q/k/v biases, a tied LM head included) prepacked for oneDNN gives
    the dense model's logits to float32 rounding, on a left-padded batch and on a cached subset."""
    dense = make_net(make_args(family, tie_embeddings=tie), seed=23)
    packed = with_weights(make_net(make_args(family, tie_embeddings=tie), seed=23), "packed")
    n_linear = 7 * dense.args.n_layers + 1
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == n_linear
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert packed.device == dense.device and packed.dtype == torch.float32
    tokens, mask = left_padded(make_prompts([11, 6, 9], seed=24), dense.args.pad_token_id)
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens, attention_mask=mask), dense(tokens, attention_mask=mask),
                                   atol=1e-5, rtol=1e-5)
        real = mask.bool()
        store_d, full_d, x, positions, key_mask = filled_store(dense, tokens, real)
        store_p, full_p, *_ = filled_store(packed, tokens, real)
        index = torch.tensor([[10, 3], [10, 8], [2, 9]])
        sub_d, _ = dense.hidden(x.gather(1, index), positions.gather(1, index), key_mask, store_d, index)
        sub_p, _ = packed.hidden(x.gather(1, index), positions.gather(1, index), key_mask, store_p, index)
    torch.testing.assert_close(sub_p, sub_d, atol=1e-5, rtol=1e-5)


def test_a_packed_model_is_not_saved(tmp_path, make_args, make_net):
    from dllm.models.loading import save_checkpoint

    net = with_weights(make_net(make_args("llada"), seed=26), "packed")
    with pytest.raises(ValueError, match="prepacked"):
        save_checkpoint(net, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_packing_leaves_other_dtypes_dense(make_args, make_net):
    net = make_net(make_args("dream"), seed=25, dtype=torch.bfloat16)
    assert pack_linear_weights(net) is False
    assert not any(isinstance(m, PackedLinear) for m in net.modules())
