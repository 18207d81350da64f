"""LLaDA2.0: the sigmoid group-limited MoE against transformers' BailingHybridMoE (the same router math),
partial RoPE against transformers' partial-rotary pieces and the published formula, the whole model run
block-causally against a float64 reference written from the published code and fed the checkpoint's own
tensors (fused query_key_value included), and the tiny checkpoint in the exact on-disk format."""
from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm.metrics.accounting import token_layer_flops
from dllm.models import llada2
from dllm.models.loading import CheckpointError, load_model, save_checkpoint
from dllm.models.tiny import make_tiny_checkpoint
from dllm.models.transformer import ModelArgs, MoEFeedForward, Transformer, apply_rope, rope_cos_sin

from conftest import edited_config, left_padded, random_prompts, tiny_args, tiny_net
from test_checkpoint import no_weight_reads  # noqa: F401 - the fixture: no tensor data read before validation

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# LLaDA2.0-mini's config.json (HF inclusionAI/LLaDA2.0-mini; the fields dFactory's copy also carries).
MINI_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184, "hidden_size": 2048,
    "intermediate_size": 5120, "moe_intermediate_size": 512, "num_hidden_layers": 20, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "score_function": "sigmoid", "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True, "norm_topk_prob": True, "first_k_dense_replace": 1, "use_qk_norm": True,
    "use_qkv_bias": False, "use_bias": False, "partial_rotary_factor": 0.5, "rotary_dim": 64, "rope_theta": 600000,
    "rope_scaling": None, "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "pad_token_id": 156892, "use_sliding_window": False, "norm_head": False,
    "use_rmsnorm": True,
}


def moe_args(**overrides) -> ModelArgs:
    """A small LLaDA2.0-style MoE: 16 experts of 8 in 4 groups (2 kept), 4 per row, a shared expert."""
    base = dict(family="llada2", ffn_dim=8, n_experts=16, n_experts_per_token=4, n_expert_groups=4,
                topk_expert_groups=2, router_score="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                n_shared_experts=1, qk_norm=True, block_causal=True)
    return tiny_args(**{**base, **overrides})


# ------------------------------------------------------------ the MoE FFN vs transformers' BailingHybrid


def bailing_moe(ffn: MoEFeedForward, args: ModelArgs):
    """transformers' BailingHybridMoE (sigmoid scores, e_score_correction_bias for the choice only, top-2 group
    sums, topk_group groups, renormalised x routed_scaling_factor, shared experts) holding ``ffn``'s weights."""
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import BailingHybridMoE

    config = transformers.BailingHybridConfig(
        hidden_size=args.dim, moe_intermediate_size=args.ffn_dim, num_local_experts=args.n_experts,
        num_experts_per_tok=args.n_experts_per_token, n_group=args.n_expert_groups,
        topk_group=args.topk_expert_groups, routed_scaling_factor=args.routed_scaling_factor,
        norm_topk_prob=args.norm_topk_prob, n_shared_experts=args.n_shared_experts, hidden_act="silu")
    # transformers >= 5.25 takes the layer's index (for per-layer SwiGLU limits, none here)
    layer = {"layer_idx": 0} if "layer_idx" in inspect.signature(BailingHybridMoE).parameters else {}
    block = BailingHybridMoE(config, **layer).eval()
    with torch.no_grad():
        block.gate.weight.copy_(ffn.router.weight)
        block.gate.e_score_correction_bias.copy_(ffn.expert_bias)
        block.experts.gate_up_proj.copy_(torch.stack([torch.cat([e.w_gate.weight, e.w_up.weight]) for e in ffn.experts]))
        block.experts.down_proj.copy_(torch.stack([e.w_down.weight for e in ffn.experts]))
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            getattr(block.shared_experts, theirs).weight.copy_(getattr(ffn.shared, ours).weight)
    return block


def moe_with_bias(args: ModelArgs, seed: int) -> MoEFeedForward:
    """The MoE FFN of a random net, with an expert bias large enough to change which experts win."""
    ffn = tiny_net(args, seed=seed).layers[0].ffn
    ffn.expert_bias.copy_(0.2 * torch.randn(args.n_experts, generator=torch.Generator().manual_seed(seed)))
    return ffn


@pytest.mark.parametrize("groups, kept, top_k, shared", [(4, 2, 4, 1), (1, 1, 3, 2), (4, 1, 1, 1)])
def test_moe_ffn_matches_transformers_bailing_hybrid(groups, kept, top_k, shared):
    args = moe_args(n_expert_groups=groups, topk_expert_groups=kept, n_experts_per_token=top_k,
                    norm_topk_prob=top_k > 1, n_shared_experts=shared)
    ffn = moe_with_bias(args, seed=1)
    x = torch.randn(3, 11, args.dim, generator=torch.Generator().manual_seed(2))
    reference = bailing_moe(ffn, args)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), reference(x), atol=1e-5, rtol=1e-5)
        _, weights, experts = reference.gate(x)  # its top-k is unsorted: compare by expert id
        mine, my_weights = ffn.route(x.reshape(-1, args.dim))
        theirs_order, my_order = experts.argsort(-1), mine.argsort(-1)
        assert torch.equal(mine.gather(-1, my_order), experts.gather(-1, theirs_order))
        torch.testing.assert_close(my_weights.gather(-1, my_order), weights.gather(-1, theirs_order))
        # The bias changes the choice here (so the comparison covers it) ...
        unbiased = moe_with_bias(args, seed=1)
        unbiased.expert_bias.zero_()
        assert not torch.equal(unbiased.route(x.reshape(-1, args.dim))[0].sort(-1).values, mine.sort(-1).values)
    # ... and never the weights: the unbiased sigmoid scores of the chosen experts, renormalised, x 2.5.
    scores = torch.sigmoid(x.reshape(-1, args.dim) @ ffn.router.weight.T).gather(-1, mine)
    expected = scores / scores.sum(-1, keepdim=True) if top_k > 1 else scores
    torch.testing.assert_close(my_weights, 2.5 * expected, atol=1e-6, rtol=1e-6)


def test_group_limit_keeps_experts_inside_the_best_groups():
    args = moe_args()
    ffn = moe_with_bias(args, seed=3)
    rows = torch.randn(40, args.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        experts, _ = ffn.route(rows)
        choice = torch.sigmoid(rows @ ffn.router.weight.T) + ffn.expert_bias
    group_score = choice.view(40, 4, 4).topk(2, dim=-1).values.sum(-1)
    best = group_score.topk(2, dim=-1).indices
    for row in range(40):
        assert set((experts[row] // 4).tolist()) <= set(best[row].tolist())
    # Without the group limit some rows would pick experts elsewhere (so the limit is exercised).
    free = choice.topk(args.n_experts_per_token, dim=-1).indices // 4
    assert any(not set(free[r].tolist()) <= set(best[r].tolist()) for r in range(40))


def test_bad_group_layouts_are_refused():
    with pytest.raises(ValueError, match="n_experts=16 in n_expert_groups=3"):
        moe_args(n_expert_groups=3)
    with pytest.raises(ValueError, match="topk_expert_groups=5"):
        moe_args(topk_expert_groups=5)
    with pytest.raises(ValueError, match="n_experts_per_token=9"):
        moe_args(topk_expert_groups=2, n_experts_per_token=9)  # 2 groups of 4 hold at most 8
    with pytest.raises(ValueError, match="router_score='relu'"):
        moe_args(router_score="relu")
    with pytest.raises(ValueError, match="n_dense_layers=1 with dense_ffn_dim=0"):
        moe_args(n_dense_layers=1)


# --------------------------------------------------------------------------------- partial RoPE


def test_partial_rope_matches_transformers_and_the_published_formula():
    """RoPE on the first rotary_dim dims of each head (rotate-half inside them), the rest untouched: as
    transformers' partial-rotary models compute it (Phi: default inv_freq over int(head_dim * factor) dims,
    rotate_half on that slice) and as modeling_llada2_moe.py writes it (pairs i, i + rotary_dim / 2)."""
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding, apply_rotary_pos_emb

    head_dim, theta = 16, 600000.0
    args = moe_args(explicit_head_dim=head_dim, explicit_rotary_dim=8, rope_theta=theta)
    positions = torch.tensor([[0, 1, 2, 7, 31, 100]])
    x = torch.randn(1, 3, 6, head_dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cos, sin = rope_cos_sin(positions, args.rotary_dim, theta, torch.float64)
    ours = apply_rope(x, cos, sin)

    config = transformers.PhiConfig(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.5, rope_theta=theta)
    hf_cos, hf_sin = PhiRotaryEmbedding(config)(x.float(), positions)
    rot, _ = apply_rotary_pos_emb(x[..., :8].float(), x[..., :8].float(), hf_cos, hf_sin)
    torch.testing.assert_close(ours.float(), torch.cat([rot, x[..., 8:].float()], -1), atol=1e-6, rtol=1e-6)

    inv_freq = theta ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # 4 frequencies for 8 dims
    angle = positions[0, :, None].double() * inv_freq  # (6, 4)
    expected = x.clone()
    for i in range(4):  # the pair (i, i + 4) turns by angle[:, i]
        a, b = x[..., i], x[..., i + 4]
        expected[..., i] = a * angle[:, i].cos() - b * angle[:, i].sin()
        expected[..., i + 4] = b * angle[:, i].cos() + a * angle[:, i].sin()
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)  # angles in float32, as published
    assert torch.equal(ours[..., 8:], x[..., 8:])


# ------------------------------------------------------------------- the published architecture


def test_published_config_gives_the_documented_architecture():
    args = llada2.args_from_config(MINI_CONFIG)
    assert (args.head_dim, args.rotary_dim, args.n_dense_layers, args.dense_ffn_dim) == (128, 64, 1, 5120)
    assert (args.n_experts, args.n_experts_per_token, args.n_expert_groups, args.topk_expert_groups) == (256, 8, 8, 4)
    assert args.router_score == "sigmoid" and args.norm_topk_prob and args.routed_scaling_factor == 2.5
    assert args.block_causal and args.qk_norm and args.logit_shift == 0 and args.n_shared_experts == 1
    assert (args.mask_token_id, args.eos_token_id, args.pad_token_id) == (156895, 156892, 156892)
    with torch.device("meta"):
        net = Transformer(args)
    total = sum(p.numel() for p in net.parameters())
    expert = 3 * args.dim * args.ffn_dim
    idle = (args.n_layers - 1) * (args.n_experts - args.n_experts_per_token) * expert
    assert round(total / 1e9, 1) == 16.3 and round((total - idle) / 1e9, 1) == 1.4  # the preset's comment
    # FLOPs per token-layer: every linear weight a row runs through (not the embedding), averaged over layers.
    per_row = total - idle - net.tok_embeddings.weight.numel() - net.output.weight.numel()
    norms = sum(p.numel() for n, p in net.named_parameters() if "norm" in n)
    assert token_layer_flops(args) == 2 * (per_row - norms) // args.n_layers


@pytest.mark.parametrize("field, value, message", [
    ("score_function", "softmax", r"score_function='softmax' is not supported \(allowed: \[None, 'sigmoid'\]"),
    ("use_qkv_bias", True, r"use_qkv_bias=True is not supported"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, r"rope_scaling=.* is not supported"),
    ("num_experts", None, r"num_experts=None is not supported"),
])
def test_unsupported_configs_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        llada2.args_from_config({**MINI_CONFIG, field: value})


# ---------------------------------------------------- a tiny checkpoint and the float64 reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tiny LLaDA2.0 checkpoint, float32 on disk (parity at float32 tolerance): a dense layer, two MoE ones."""
    return make_tiny_checkpoint("llada2", tmp_path_factory.mktemp("llada2") / "llada2", seed=6, dtype=torch.float32,
                                n_layers=3)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def reference_logits(folder: Path, tokens: list[int], block: int) -> torch.Tensor:
    """Logits (T, V) of one unpadded sequence, in float64, from the checkpoint's tensors under their published
    names, computed as modeling_llada2_moe.py does with generate()'s block-causal mask (block i attends to
    blocks <= i, counted from position 0); the router GEMM and its sigmoid in float32 as published."""
    cfg = json.loads((folder / "config.json").read_text())
    t = {k: v.double() for k, v in all_tensors(folder).items()}
    T, H, Hkv, hd = len(tokens), cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rd, eps, E = int(hd * cfg["partial_rotary_factor"]), cfg["rms_norm_eps"], cfg["num_experts"]

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def mlp(x, prefix):
        gate, up = x @ t[f"{prefix}.gate_proj.weight"].T, x @ t[f"{prefix}.up_proj.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ t[f"{prefix}.down_proj.weight"].T

    pos = torch.arange(T, dtype=torch.float64)
    angle = pos[:, None] * cfg["rope_theta"] ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()

    def rope(x):  # (heads, T, hd): rotate the first rd dims, rotate-half inside them
        r = x[..., :rd]
        return torch.cat([r * cos + torch.cat([-r[..., rd // 2:], r[..., : rd // 2]], -1) * sin, x[..., rd:]], -1)

    allowed = (torch.arange(T)[None, :] // block) <= (torch.arange(T)[:, None] // block)
    h = t["model.word_embeddings.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = rms(h, t[f"{p}.input_layernorm.weight"])
        qkv = (x @ t[f"{p}.attention.query_key_value.weight"].T).view(T, H + 2 * Hkv, hd).transpose(0, 1)
        q, k, v = qkv.split([H, Hkv, Hkv])
        q, k = rms(q, t[f"{p}.attention.query_layernorm.weight"]), rms(k, t[f"{p}.attention.key_layernorm.weight"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, H * hd)
        h = h + out @ t[f"{p}.attention.dense.weight"].T
        x = rms(h, t[f"{p}.post_attention_layernorm.weight"])
        if i < cfg["first_k_dense_replace"]:
            h = h + mlp(x, f"{p}.mlp")
            continue
        s = torch.sigmoid(x.float() @ t[f"{p}.mlp.gate.weight"].float().T).double()
        choice = s + t[f"{p}.mlp.gate.expert_bias"]
        groups = choice.view(T, cfg["n_group"], -1)
        best = groups.topk(2, dim=-1).values.sum(-1).topk(cfg["topk_group"], dim=-1).indices
        keep = torch.zeros(T, cfg["n_group"], dtype=torch.bool).scatter(1, best, True)
        choice = groups.masked_fill(~keep[..., None], float("-inf")).view(T, E)
        idx = choice.topk(cfg["num_experts_per_tok"], dim=-1).indices
        w = s.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg["routed_scaling_factor"]
        every = torch.stack([mlp(x, f"{p}.mlp.experts.{e}") for e in range(E)])  # (E, T, d)
        routed = sum(w[:, j, None] * every[idx[:, j], torch.arange(T)] for j in range(idx.shape[1]))
        h = h + routed + mlp(x, f"{p}.mlp.shared_experts")
    return rms(h, t["model.norm.weight"]) @ t["lm_head.weight"].T


def test_block_causal_model_matches_float64_reference(checkpoint):
    """A left-padded batch through the loaded model (blocks counted from each row's first token) gives every
    row's reference logits; the float64 model matches tightly. Blocks of 4 over prompts of 11, 5 and 8."""
    block = 4
    prompts = random_prompts([11, 5, 8], seed=7)
    net = load_model(str(checkpoint), expected_family="llada2")
    assert net.args.n_dense_layers == 1 and net.args.n_layers == 3 and net.args.rotary_dim < net.args.head_dim
    tokens, mask = left_padded(prompts, net.args.pad_token_id)
    real = mask.bool()
    expected = [reference_logits(checkpoint, p, block) for p in prompts]
    with torch.no_grad():
        ours32 = net(tokens, attention_mask=mask, block_length=block)
        ours64 = net.to(torch.float64)(tokens, attention_mask=mask, block_length=block)
        bidirectional = net(tokens, attention_mask=mask)
    for row, ref in enumerate(expected):
        torch.testing.assert_close(ours32[row][real[row]].double(), ref, atol=1e-4, rtol=1e-4)
        # float64 but for RoPE's angles and the router, float32 as published (~1e-7 here)
        torch.testing.assert_close(ours64[row][real[row]], ref, atol=1e-6, rtol=1e-6)
    # Block-causality is what the reference checks: attending to later blocks changes the early positions.
    assert not torch.allclose(bidirectional[0][real[0]][:block], expected[0][:block], atol=1e-4)


# ------------------------------------------------------------------------ the checkpoint on disk


def published_keys(n_layers: int, n_experts: int) -> set[str]:
    keys = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                 f"{p}.attention.query_key_value.weight", f"{p}.attention.dense.weight",
                 f"{p}.attention.query_layernorm.weight", f"{p}.attention.key_layernorm.weight"}
        experts = [f"{p}.mlp.experts.{e}" for e in range(n_experts)]
        mlps = [f"{p}.mlp"] if i == 0 else [f"{p}.mlp.shared_experts", *experts]
        keys |= {f"{m}.{w}_proj.weight" for m in mlps for w in ("gate", "up", "down")}
        if i:
            keys |= {f"{p}.mlp.gate.weight", f"{p}.mlp.gate.expert_bias"}
    return keys


def test_checkpoint_keys_shapes_and_config_are_the_published_ones(checkpoint):
    files = all_tensors(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert set(files) == published_keys(cfg["num_hidden_layers"], cfg["num_experts"])
    assert cfg["model_type"] == "llada2_moe" and cfg["architectures"] == ["LLaDA2MoeModelLM"]
    assert {k: cfg[k] for k in ("first_k_dense_replace", "score_function", "n_group", "topk_group",
                                "num_shared_experts", "partial_rotary_factor", "use_qk_norm")} == {
        "first_k_dense_replace": 1, "score_function": "sigmoid", "n_group": 4, "topk_group": 2,
        "num_shared_experts": 1, "partial_rotary_factor": 0.5, "use_qk_norm": True}
    H, Hkv, hd, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["hidden_size"]
    qkv = files["model.layers.1.attention.query_key_value.weight"]
    assert qkv.shape == ((H + 2 * Hkv) * hd, d)
    assert files["model.layers.1.mlp.gate.expert_bias"].shape == (cfg["num_experts"],)
    assert files["model.layers.0.mlp.gate_proj.weight"].shape == (cfg["intermediate_size"], d)
    net = load_model(str(checkpoint))
    attn = net.layers[1].attn
    # Fused rows Q | K | V (the published forward views them as H + 2 * Hkv heads and splits on that axis).
    assert torch.equal(qkv, torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
    assert torch.equal(net.layers[2].ffn.expert_bias, files["model.layers.2.mlp.gate.expert_bias"])
    assert net.layers[2].ffn.expert_bias.abs().sum() > 0  # a non-trivial bias was written and read
    bf16 = load_model(str(checkpoint), dtype=torch.bfloat16)
    assert torch.equal(bf16.layers[2].ffn.expert_bias, files["model.layers.2.mlp.gate.expert_bias"].bfloat16())


def test_save_load_round_trip_is_exact(checkpoint, tmp_path):
    net = load_model(str(checkpoint))
    save_checkpoint(net, tmp_path / "again")
    config = json.loads((checkpoint / "config.json").read_text())
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config
    before, after = all_tensors(checkpoint), all_tensors(tmp_path / "again")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert load_model(str(tmp_path / "again")).args == net.args


def test_sharded_checkpoint_loads_the_same(checkpoint, tmp_path):
    sharded = make_tiny_checkpoint("llada2", tmp_path / "sharded", seed=6, dtype=torch.float32, n_layers=3,
                                   max_shard_bytes=40_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_model(str(checkpoint)).state_dict(), load_model(str(sharded), expected_family="llada2").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_and_chat_format(checkpoint):
    from dllm.models.tokenization import load_tokenizer, stop_token_ids

    tok = load_tokenizer(checkpoint)
    net = load_model(str(checkpoint))
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == net.args.mask_token_id
    assert tok.eos_token_id == net.args.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False)
    assert prompt == ("<role>SYSTEM</role>detailed thinking off<|role_end|>"
                      "<role>HUMAN</role>1+1=<|role_end|><role>ASSISTANT</role>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with_system = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert with_system.startswith("<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|><role>HUMAN</role>Hi")
    assert tok.convert_tokens_to_ids("<|role_end|>") in stop_token_ids(tok, net.args)


@pytest.mark.parametrize("fields, message", [
    (dict(num_key_value_heads=1),
     r"model\.layers\.0\.attention\.query_key_value\.weight: shape \(128, 64\), config.json implies \(96, 64\)"),
    (dict(first_k_dense_replace=2), r"unexpected key model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight"),
    (dict(num_shared_experts=None), r"unexpected key model\.layers\.1\.mlp\.shared_experts"),
    (dict(score_function="softmax"), r"score_function='softmax' is not supported"),
])
def test_mismatches_are_refused_before_any_weight_is_read(checkpoint, tmp_path, no_weight_reads, fields, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(str(edited_config(checkpoint, tmp_path, **fields)))


def test_a_missing_expert_bias_is_refused(checkpoint, tmp_path, no_weight_reads):
    from safetensors.torch import save_file

    folder = Path(shutil.copytree(checkpoint, tmp_path / "no_bias"))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.gate.expert_bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing key model\.layers\.2\.mlp\.gate\.expert_bias"):
        load_model(str(folder))


def test_family_is_read_from_model_type(checkpoint):
    with pytest.raises(CheckpointError, match=r"a 'llada2' checkpoint \(model_type 'llada2_moe'\).*family='llada_moe'"):
        load_model(str(checkpoint), expected_family="llada_moe")
