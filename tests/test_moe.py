"""LLaDA-MoE: the MoE FFN against transformers' OLMoE block; the whole model, causally, against
transformers' Qwen3-MoE (the same per-head QK-norm and softmax top-k router) through the real
checkpoint key names; bidirectionally against a float64 reference; cached steps route only the
rows they recompute, and every cache method at refresh 1 reproduces ``none``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate
from dllm.models.loading import CheckpointError, load_model
from dllm.models.tiny import make_tiny_checkpoint
from dllm.models.transformer import KVStore, MoEFeedForward

from conftest import (MASK_ID, assert_causal_matches, edited_config, float64_reference, left_padded, random_prompts, tiny_args,
                      tiny_net, with_weights)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def moe_args(**overrides):
    """A small LLaDA-MoE ModelArgs: 6 experts of width 16, 2 per row, QK-norm, GQA."""
    base = dict(n_experts=6, n_experts_per_token=2, ffn_dim=16, qk_norm=True, rope_theta=50000.0, norm_eps=1e-5)
    return tiny_args("llada_moe", **{**base, **overrides})


# ------------------------------------------------------------------ the MoE FFN vs transformers' OLMoE


def olmoe_block(ffn: MoEFeedForward, args):
    """transformers' OlmoeSparseMoeBlock holding ``ffn``'s weights (experts stacked as it stores them)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = transformers.OlmoeConfig(hidden_size=args.dim, intermediate_size=args.ffn_dim, num_experts=args.n_experts,
                                      num_experts_per_tok=args.n_experts_per_token, norm_topk_prob=args.norm_topk_prob,
                                      hidden_act="silu")
    block = OlmoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        block.gate.weight.copy_(ffn.router.weight)
        block.experts.gate_up_proj.copy_(torch.stack([torch.cat([e.w_gate.weight, e.w_up.weight]) for e in ffn.experts]))
        block.experts.down_proj.copy_(torch.stack([e.w_down.weight for e in ffn.experts]))
    return block


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_ffn_matches_transformers_olmoe(norm_topk_prob):
    args = moe_args(norm_topk_prob=norm_topk_prob, n_experts=8, n_experts_per_token=3)
    ffn = tiny_net(args, seed=1).layers[0].ffn
    x = torch.randn(3, 11, args.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = ffn(x), olmoe_block(ffn, args)(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # The flag matters on these weights, so the comparison would catch it being ignored.
    flipped = MoEFeedForward(dataclasses.replace(args, norm_topk_prob=not norm_topk_prob))
    flipped.load_state_dict(ffn.state_dict())
    assert not torch.allclose(flipped(x), ours, atol=1e-3)


def test_moe_ffn_routes_rows_independently():
    """A row's output does not depend on the other rows routed with it (so a cached step may route
    only its active rows), and rows really use different experts."""
    args = moe_args()
    ffn = tiny_net(args, seed=3).layers[1].ffn
    x = torch.randn(1, 24, args.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        together = ffn(x)
        alone = torch.cat([ffn(x[:, i : i + 1]) for i in range(24)], 1)
        chosen = ffn.router(x[0]).topk(args.n_experts_per_token, dim=-1).indices
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)
    assert len(chosen.unique()) == args.n_experts  # every expert is used by some row here


def test_bad_expert_counts_are_refused():
    with pytest.raises(ValueError, match="n_experts=4, n_experts_per_token=5"):
        moe_args(n_experts=4, n_experts_per_token=5)
    with pytest.raises(ValueError, match="n_experts=0, n_experts_per_token=2"):
        tiny_args("llada", n_experts_per_token=2)


# ------------------------------------------------------------ a tiny checkpoint in the published format


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tiny LLaDA-MoE checkpoint (float32 on disk, so that parity is checked at float32 tolerance)."""
    return make_tiny_checkpoint("llada_moe", tmp_path_factory.mktemp("moe") / "llada_moe", seed=5, dtype=torch.float32)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def qwen3_moe(folder: Path):
    """transformers' Qwen3MoeForCausalLM built from the checkpoint's config.json and tensors (per-expert
    keys stacked into its fused expert tensors; every other key name is the same)."""
    cfg = json.loads((folder / "config.json").read_text())
    config = transformers.Qwen3MoeConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["dense_intermediate_size"],
        moe_intermediate_size=cfg["expert_intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["hidden_size"] // cfg["num_attention_heads"], num_experts=cfg["num_experts"],
        num_experts_per_tok=cfg["num_experts_per_tok"], norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"], max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, hidden_act="silu",
    )
    config._attn_implementation = "eager"
    tensors = all_tensors(folder)
    state = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(cfg["num_hidden_layers"]):
        expert = [{w: tensors[f"model.layers.{i}.mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down")}
                  for e in range(cfg["num_experts"])]
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in expert])
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([x["down"] for x in expert])
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary_emb" not in k], (missing, unexpected)
    return model


def test_causal_matches_transformers_qwen3_moe(checkpoint):
    net = load_model(str(checkpoint), expected_family="llada_moe")
    assert net.args.qk_norm and net.args.n_experts == 8 and net.args.n_kv_heads < net.args.n_heads
    assert_causal_matches(net, qwen3_moe(checkpoint), random_prompts([12, 7, 9], seed=6))


def test_bidirectional_matches_float64_reference():
    net = tiny_net(moe_args(n_layers=3), seed=7)
    tokens, mask = left_padded(random_prompts([10, 4, 7], seed=8), net.args.pad_token_id)
    expected = float64_reference(net, tokens, mask)
    real = mask.bool()
    with torch.no_grad():
        ours = net(tokens, attention_mask=mask)
    torch.testing.assert_close(ours[real].double(), expected[real], atol=1e-4, rtol=1e-4)
    ours64 = net.to(torch.float64)(tokens, attention_mask=mask)
    torch.testing.assert_close(ours64[real], expected[real], atol=1e-5, rtol=1e-5)


def test_active_subset_over_the_store_equals_full_forward():
    """Rows recomputed over a KVStore (keys stored after QK-norm and RoPE) give the full forward's states."""
    net = tiny_net(moe_args(), seed=9)
    B, T, A = 2, 13, 4
    tokens = torch.tensor(random_prompts([T] * B, seed=10))
    positions = torch.arange(T).expand(B, T)
    key_mask = torch.cat([torch.ones(B, T, dtype=torch.bool), torch.zeros(B, 1, dtype=torch.bool)], 1)[:, None, None]
    store = KVStore(net.args, B, T, "cpu", torch.float32)
    with torch.no_grad():
        full, _ = net.hidden(tokens, positions, key_mask, store, None)
        index = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(11 + b))[:A] for b in range(B)])
        sub, _ = net.hidden(tokens.gather(1, index), index, key_mask, store, index)
    torch.testing.assert_close(sub, full.gather(1, index[..., None].expand(-1, -1, net.args.dim)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ the checkpoint on disk


def test_checkpoint_keys_and_weights_are_the_published_ones(checkpoint):
    files = all_tensors(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAMoEModelLM"]
    assert {"num_experts", "num_experts_per_tok", "expert_intermediate_size", "qk_layernorm", "norm_topk_prob"} <= set(cfg)
    for key in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
                "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight", "lm_head.weight"):
        assert key in files
    assert files["model.layers.0.mlp.gate.weight"].shape == (cfg["num_experts"], cfg["hidden_size"])
    assert files["model.layers.0.self_attn.q_norm.weight"].shape == (cfg["hidden_size"] // cfg["num_attention_heads"],)
    net = load_model(str(checkpoint))
    state = net.state_dict()
    assert torch.equal(state["layers.1.ffn.experts.7.w_down.weight"], files["model.layers.1.mlp.experts.7.down_proj.weight"])
    assert torch.equal(state["layers.0.ffn.router.weight"], files["model.layers.0.mlp.gate.weight"])


def test_sharded_checkpoint_loads_the_same(checkpoint, tmp_path):
    sharded = make_tiny_checkpoint("llada_moe", tmp_path / "sharded", seed=5, dtype=torch.float32, max_shard_bytes=40_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    a, b = load_model(str(checkpoint)).state_dict(), load_model(str(sharded)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_and_chat_format(checkpoint):
    from dllm.models.tokenization import load_tokenizer, stop_token_ids

    tok = load_tokenizer(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == cfg["mask_token_id"]
    assert tok.eos_token_id == cfg["eos_token_id"] == tok.pad_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<role>HUMAN</role>1+1=<|role_end|><role>ASSISTANT</role>"
    net = load_model(str(checkpoint))
    assert tok.convert_tokens_to_ids("<|role_end|>") in stop_token_ids(tok, net.args)


@pytest.mark.parametrize("fields, message", [
    (dict(norm_topk_prob=True), r"norm_topk_prob=True is not supported \(allowed: \[None, False\]"),
    (dict(moe_router_score_function="sigmoid"), r"moe_router_score_function='sigmoid' is not supported"),
    (dict(shared_expert_intermediate_size=64), r"shared_expert_intermediate_size=64 is not supported"),
    (dict(moe_layer_freq=[0, 1]), r"moe_layer_freq=\[0, 1\] is not supported"),
    (dict(num_experts_per_tok=9), r"n_experts=8, n_experts_per_token=9"),
])
def test_unsupported_configs_are_refused_before_weights(checkpoint, tmp_path, fields, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(str(edited_config(checkpoint, tmp_path, **fields)))


def test_family_is_told_apart_from_dense_llada(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"is a 'llada_moe' checkpoint \(model_type 'llada'\).*family='llada'"):
        load_model(str(checkpoint), expected_family="llada")
    # The dllm toolkit's instructions rename the model_type; the checkpoint is the same.
    renamed = load_model(str(edited_config(checkpoint, tmp_path, model_type="lladamoe")), expected_family="llada_moe")
    assert renamed.args == load_model(str(checkpoint)).args


# ------------------------------------------------------------------ caching on the tiny MoE model

GEN = 16
EXACT = [  # (cache, params that refresh every step, decoding, decoding params)
    ("dkv_decode", dict(refresh_interval=1, variant="decode"), "low_confidence", dict(block_length=8)),
    ("dkv_greedy", dict(refresh_interval=1, window=4), "random", dict(block_length=8)),
    ("d2cache", dict(refresh_interval=1, k=4, p=0.1, sigma=10.0), "certainty_prior", dict(sigma=10.0)),
    ("prefix", dict(refresh_interval=1), "low_confidence", dict(block_length=8)),
    ("dual", dict(refresh_interval=1), "low_confidence", dict(block_length=8)),
    ("dllm_cache", dict(prompt_interval=1, response_interval=1), "low_confidence", dict(block_length=8)),
]


@pytest.fixture(scope="module", params=["dense", "packed"])
def moe_net(request):
    return with_weights(tiny_net(moe_args(), seed=12, logit_scale=8.0, silent_ids=(MASK_ID,)), request.param)


@pytest.mark.parametrize("lengths", [(10,), (7, 3, 10)], ids=["batch1", "batch3_padded"])
@pytest.mark.parametrize("method,params,decoding,dparams", EXACT, ids=[e[0] for e in EXACT])
def test_refresh_one_reproduces_none(moe_net, lengths, method, params, decoding, dparams):
    prompts = random_prompts(lengths, seed=13)
    seeded = lambda: torch.Generator().manual_seed(14)  # noqa: E731 - the random decoder's draws
    base = generate(moe_net, prompts, build_decoder(decoding, steps=GEN, **dparams), build_cache("none"), GEN,
                    generator=seeded())
    out = generate(moe_net, prompts, build_decoder(decoding, steps=GEN, **dparams), build_cache(method, **params), GEN,
                   generator=seeded())
    assert torch.equal(out.tokens, base.tokens)
    assert not (out.tokens == MASK_ID).any()
    assert out.recompute_ratio == pytest.approx(1.0)


def test_a_cached_step_routes_only_its_active_rows():
    """Rows reaching the routers over a dKV-Cache run = the run's active token-layers (batch 1)."""
    net = tiny_net(moe_args(), seed=15, logit_scale=8.0, silent_ids=(MASK_ID,))
    routed = []
    for block in net.layers:
        block.ffn.router.register_forward_hook(lambda _m, inputs, _o: routed.append(inputs[0].shape[0]))
    out = generate(net, random_prompts((10,), seed=16), build_decoder("low_confidence", steps=GEN, block_length=8),
                   build_cache("dkv_decode", refresh_interval=4), GEN)
    assert sum(routed) == out.active_token_layers
    assert out.recompute_ratio < 0.9  # the run did skip rows


def test_bench_moe_preset_runs_and_counts_active_parameters(tmp_path):
    """scripts/bench.py --preset moe_cpu (shortened): every method against none on the MoE model, and the
    active parameters per row = everything but the experts a row is not routed to."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench

    rows = bench.main(["--preset", "moe_cpu", "--prompt-length", "8", "--gen-length", "32", "--methods", "dkv_decode",
                       "--warmup", "none", "--threads", "1", "--samplers", "", "--json", str(tmp_path / "rows.json")])
    assert [r["method"] for r in rows] == ["none", "dkv_decode"] and {r["family"] for r in rows} == {"llada_moe"}
    assert rows[1]["recompute_ratio"] < 1
    margs = bench.model_args(bench.parse_args(["--preset", "moe_cpu"]))
    net = bench.Transformer(margs)
    n_params = sum(p.numel() for p in net.parameters())
    one_expert = sum(p.numel() for p in net.layers[0].ffn.experts[0].parameters())
    idle = margs.n_layers * (margs.n_experts - margs.n_experts_per_token) * one_expert
    assert bench.active_parameters(margs, n_params) == n_params - idle
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "llada_moe", "--family", "dream"])
