"""LLaDA2.0 (inclusionAI/LLaDA2.0-mini, -flash): Ling-2.0-style MoE config and key names, block diffusion.

A LLaMA-shaped transformer (pre-norm RMSNorm, untied head, logits unshifted) run block-causally
(bidirectional inside a block of the decoder's block_length, causal across blocks), as published
``modeling_llada2_moe.py`` / ``generate`` computes it:
- attention: one fused ``query_key_value`` projection, rows Q (n_heads) | K | V (n_kv_heads each,
  GQA), loaded into wq / wk / wv; per-head RMSNorm of queries and keys (``use_qk_norm``) before a
  *partial* RoPE that rotates the first ``head_dim * partial_rotary_factor`` dims of each head in
  rotate-half layout (``rotary_dim`` in config.json is not read by that code, nor here);
- FFN: the first ``first_k_dense_replace`` layers a dense SwiGLU of ``intermediate_size``, the others
  a sigmoid-routed mixture (expert_bias for the choice only, ``n_group`` / ``topk_group``
  group-limited top-k, the k weights always renormalised when k > 1 whatever ``norm_topk_prob``
  says, times ``routed_scaling_factor``) of ``moe_intermediate_size`` experts plus
  ``num_shared_experts`` shared ones (see dllm.models.transformer.MoEFeedForward).

Mask, eos and pad ids are not in the published config.json: 156895 (<|mask|>) and 156892
(<|endoftext|>, eos = pad) are ``generate()``'s defaults; a config.json that carries
``mask_token_id`` / ``eos_token_id`` (the tiny checkpoints) is read.
"""
from __future__ import annotations

from .hf_config import check_supported
from .transformer import ModelArgs

MODEL_TYPE = "llada2_moe"
MASK_TOKEN_ID, EOS_TOKEN_ID = 156895, 156892
BLOCK_LENGTH = 32  # generate()'s block_length, the block LLaDA2.0 was trained with (not in config.json)
QKV = ("layers.{i}.attn.wq.weight", "layers.{i}.attn.wk.weight", "layers.{i}.attn.wv.weight")

# (checkpoint key, native key); a tuple of native keys: the checkpoint tensor is theirs concatenated
# along dim 0 (dllm.models.loading splits it on load and fuses it on save). "{i}": layer, "{e}": expert.
KEYS = [
    ("model.word_embeddings.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.attention.query_key_value.weight", QKV),
    ("model.layers.{i}.attention.dense.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]
QK_NORM_KEYS = [
    ("model.layers.{i}.attention.query_layernorm.weight", "layers.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.attention.key_layernorm.weight", "layers.{i}.attn.k_norm.weight"),
]
DENSE_KEYS = [
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.ffn.w_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.ffn.w_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.ffn.w_down.weight"),
]
ROUTER_KEYS = [
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.weight"),
    ("model.layers.{i}.mlp.gate.expert_bias", "layers.{i}.ffn.expert_bias"),
]
SHARED_KEYS = [
    ("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "layers.{i}.ffn.shared.w_gate.weight"),
    ("model.layers.{i}.mlp.shared_experts.up_proj.weight", "layers.{i}.ffn.shared.w_up.weight"),
    ("model.layers.{i}.mlp.shared_experts.down_proj.weight", "layers.{i}.ffn.shared.w_down.weight"),
]
EXPERT_KEYS = [
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers.{i}.ffn.experts.{e}.w_gate.weight"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{i}.ffn.experts.{e}.w_up.weight"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers.{i}.ffn.experts.{e}.w_down.weight"),
]

# config field -> the values this implementation computes (None = absent / null in config.json); the
# published code honours these, so any other value would mean another network.
SUPPORTED = {
    "hidden_act": (None, "silu"),
    "use_qkv_bias": (None, False),
    "use_bias": (None, False),
    "rope_scaling": (None,),
    "score_function": (None, "sigmoid"),
    "router_dtype": (None, "fp32"),
    "tie_word_embeddings": (None, False),
    "norm_head": (None, False),
    "use_rmsnorm": (None, True),
    "use_sliding_window": (None, False),
}


def describes(cfg: dict) -> bool:
    return cfg.get("model_type") == MODEL_TYPE


def args_from_config(cfg: dict) -> ModelArgs:
    check_supported(cfg, SUPPORTED, "LLaDA2.0", "; the published modeling_llada2_moe.py computes only these")
    if not cfg.get("num_experts"):
        raise ValueError(f"LLaDA2.0 config: num_experts={cfg.get('num_experts')!r} is not supported "
                         "(allowed: an MoE model, as LLaDA2.0-mini / -flash)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    # Absent fields take the published configuration class's defaults (partial_rotary_factor 0.5,
    # use_qk_norm True, n_group 8, topk_group 4, routed_scaling_factor 2.5, no shared or dense layers).
    # transformers 5 re-saves rope_theta / partial_rotary_factor inside rope_parameters.
    rope = cfg.get("rope_parameters") or {}
    rotary_dim = int(head_dim * cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5)))
    rope_theta = cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)
    top_k = cfg["num_experts_per_tok"]
    eos = cfg.get("eos_token_id", EOS_TOKEN_ID)
    pad = cfg.get("pad_token_id")
    return ModelArgs(
        family="llada2",
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_dim=cfg["moe_intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rope_theta=float(rope_theta),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=False,
        tie_embeddings=False,
        max_seq_len=cfg.get("max_position_embeddings", 16384),
        mask_token_id=cfg.get("mask_token_id", MASK_TOKEN_ID),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=EOS_TOKEN_ID if pad is None else pad,
        logit_shift=0,
        n_experts=cfg["num_experts"],
        n_experts_per_token=top_k,
        norm_topk_prob=top_k > 1,  # the published gate renormalises whenever k > 1
        qk_norm=bool(cfg.get("use_qk_norm", True)),
        explicit_head_dim=head_dim,
        explicit_rotary_dim=rotary_dim,
        block_causal=True,
        trained_block_length=BLOCK_LENGTH,
        router_score="sigmoid",
        n_expert_groups=cfg.get("n_group", 8),
        topk_expert_groups=cfg.get("topk_group", 4),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 2.5)),
        n_shared_experts=cfg.get("num_shared_experts") or 0,
        n_dense_layers=cfg.get("first_k_dense_replace") or 0,
        dense_ffn_dim=cfg.get("intermediate_size") or 0,
    )


def config_from_args(args: ModelArgs) -> dict:
    """config.json fields as the published LLaDA2.0 checkpoints write them (auto_map, for remote code
    we never run, is left out; mask_token_id / eos_token_id are added so that a tiny tokenizer's ids
    are found)."""
    if args.router_score != "sigmoid" or args.norm_topk_prob != (args.n_experts_per_token > 1):
        raise ValueError("LLaDA2.0 checkpoints route with sigmoid scores and renormalise the k weights when k > 1")
    if not args.block_causal or args.qkv_bias or args.tie_embeddings or args.logit_shift:
        raise ValueError("LLaDA2.0 is block-causal, unshifted, with no q/k/v bias and an untied head")
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": MODEL_TYPE,
        "attention_dropout": 0.0,
        "num_hidden_layers": args.n_layers,
        "hidden_size": args.dim,
        "intermediate_size": args.dense_ffn_dim,
        "first_k_dense_replace": args.n_dense_layers,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "moe_intermediate_size": args.ffn_dim,
        "norm_topk_prob": True,
        "num_experts_per_tok": args.n_experts_per_token,
        "norm_head": False,
        "num_attention_heads": args.n_heads,
        "num_experts": args.n_experts,
        "num_key_value_heads": args.n_kv_heads,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_bias": False,
        "use_rmsnorm": True,
        "rms_norm_eps": args.norm_eps,
        "head_dim": args.head_dim,
        "num_shared_experts": args.n_shared_experts or None,
        "use_cache": False,
        "use_qkv_bias": False,
        "use_qk_norm": args.qk_norm,
        "embedding_dropout": 0.0,
        "norm_softmax": False,
        "output_dropout": 0.0,
        "vocab_size": args.vocab_size,
        "rotary_dim": args.rotary_dim,
        "using_split_qkv_in_self_attention": False,
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "routed_scaling_factor": args.routed_scaling_factor,
        "n_group": args.n_expert_groups,
        "topk_group": args.topk_expert_groups,
        "score_function": "sigmoid",
        "initializer_range": 0.02,
        "max_window_layers": 28,
        "output_router_logits": False,
        "pad_token_id": args.pad_token_id,
        "partial_rotary_factor": args.rotary_dim / args.head_dim,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "eos_token_id": args.eos_token_id,
        "mask_token_id": args.mask_token_id,
    }


def _format(native: str | tuple[str, ...], **where: int) -> str | tuple[str, ...]:
    return native.format(**where) if isinstance(native, str) else tuple(n.format(**where) for n in native)


def key_pairs(args: ModelArgs) -> list[tuple[str, str | tuple[str, ...]]]:
    per_layer = [p for p in KEYS if "{i}" in p[0]] + (QK_NORM_KEYS if args.qk_norm else [])
    pairs = [p for p in KEYS if "{i}" not in p[0]]
    for i in range(args.n_layers):
        pairs += [(ck.format(i=i), _format(nk, i=i)) for ck, nk in per_layer]
        if i < args.n_dense_layers:
            pairs += [(ck.format(i=i), nk.format(i=i)) for ck, nk in DENSE_KEYS]
            continue
        pairs += [(ck.format(i=i), nk.format(i=i)) for ck, nk in ROUTER_KEYS]
        if args.n_shared_experts:
            pairs += [(ck.format(i=i), nk.format(i=i)) for ck, nk in SHARED_KEYS]
        pairs += [(ck.format(i=i, e=e), nk.format(i=i, e=e)) for e in range(args.n_experts) for ck, nk in EXPERT_KEYS]
    return pairs
