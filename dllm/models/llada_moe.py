"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-*): OLMoE-style config and key names, run bidirectionally.

A LLaMA-shaped bidirectional transformer (RMSNorm, RoPE, no linear biases, untied head) whose FFN
is a sparse mixture of SwiGLU experts, with a per-head RMSNorm of queries and keys. Its published
config.json says ``model_type: "llada"``, like dense LLaDA's; the two are told apart by the MoE
fields (``num_experts``). The dllm toolkit tells its users to rewrite the type to "lladamoe",
which is accepted too.

What the published ``modeling_lladamoe.py`` computes, and so what this module accepts:
- router: softmax over the experts in float32, plain top-k; the top-k weights are never
  renormalised (that file hard-codes ``norm_topk_prob = False`` whatever config.json says), and
  ``moe_router_score_function`` / ``routed_scaling_factor`` / ``router_*_group`` are stored but
  unused there. Values that would mean a different router if honoured are refused rather than
  silently ignored.
- ``qk_layernorm``: RMSNorm over head_dim of every query and key head, before RoPE.
- no shared expert in the 7B-A1B checkpoints (``shared_expert_intermediate_size: null``) and an
  MoE FFN in every layer (``moe_layer_freq`` all 1); other layouts are refused.
"""
from __future__ import annotations

from .hf_config import check_supported, hf_shape
from .transformer import ModelArgs

MODEL_TYPES = ("llada", "lladamoe")
# The model card's generate() uses mask_id=156895 (<|mask|>); eos = pad = 156892 (<|endoftext|>).
# Whether the published config.json carries mask_token_id could not be confirmed: read it if present.
MASK_TOKEN_ID, EOS_TOKEN_ID = 156895, 156892

KEYS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.mlp.gate.weight", "layers.{i}.ffn.router.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]
QK_NORM_KEYS = [
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
]
EXPERT_KEYS = [
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers.{i}.ffn.experts.{e}.w_gate.weight"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{i}.ffn.experts.{e}.w_up.weight"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers.{i}.ffn.experts.{e}.w_down.weight"),
]

# config field -> the values this implementation computes (None = absent / null in config.json).
SUPPORTED = {
    "hidden_act": (None, "silu"),
    "attention_bias": (None, False),
    "clip_qkv": (None,),
    "rope_scaling": (None,),
    "partial_rotary_factor": (None, 1, 1.0),
    "shared_expert_intermediate_size": (None, 0),
    "moe_router_score_function": (None, "softmax"),
    "moe_router_enable_expert_bias": (None, False),
    "routed_scaling_factor": (None, 1, 1.0),
    "norm_topk_prob": (None, False),
    "tie_word_embeddings": (None, False),
}


def describes(cfg: dict) -> bool:
    """Whether a config.json is LLaDA-MoE's (dense LLaDA shares the model_type, not the MoE fields)."""
    return cfg.get("model_type") == "lladamoe" or (cfg.get("model_type") == "llada" and "num_experts" in cfg)


def args_from_config(cfg: dict) -> ModelArgs:
    check_supported(cfg, SUPPORTED, "LLaDA-MoE", "; the published modeling_lladamoe.py computes only these")
    n_layers = cfg["num_hidden_layers"]
    layer_freq = cfg.get("moe_layer_freq") or [1] * n_layers
    if len(layer_freq) != n_layers or not all(layer_freq):
        raise ValueError(
            f"LLaDA-MoE config: moe_layer_freq={layer_freq!r} is not supported (allowed: an MoE FFN in every "
            f"one of the {n_layers} layers, [1] * {n_layers}, as in LLaDA-MoE-7B-A1B)"
        )
    eos = cfg.get("eos_token_id", EOS_TOKEN_ID)
    pad = cfg.get("pad_token_id")
    return ModelArgs(
        family="llada_moe",
        # tie_word_embeddings is False in every config SUPPORTED accepts
        **hf_shape(cfg, 8192, ffn_field="expert_intermediate_size", rope_theta=50000.0, norm_eps=1e-5),
        qkv_bias=False,
        mask_token_id=cfg.get("mask_token_id", MASK_TOKEN_ID),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=EOS_TOKEN_ID if pad is None else pad,
        logit_shift=0,
        n_experts=cfg["num_experts"],
        n_experts_per_token=cfg["num_experts_per_tok"],
        norm_topk_prob=False,
        qk_norm=bool(cfg.get("qk_layernorm", False)),
    )


def config_from_args(args: ModelArgs) -> dict:
    """config.json fields as the published LLaDA-MoE-7B-A1B checkpoints write them (their auto_map,
    for remote code we never run, is left out; mask_token_id is written so that a tiny tokenizer's
    mask id is found)."""
    if args.norm_topk_prob:
        raise ValueError("LLaDA-MoE checkpoints never renormalise the top-k weights (norm_topk_prob must be false)")
    return {
        "architectures": ["LLaDAMoEModelLM"],
        "model_type": "llada",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "dense_intermediate_size": 4 * args.dim,
        "expert_intermediate_size": args.ffn_dim,
        "shared_expert_intermediate_size": None,
        "num_experts": args.n_experts,
        "num_experts_per_tok": args.n_experts_per_token,
        "moe_layer_freq": [1] * args.n_layers,
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False,
        "routed_scaling_factor": 1,
        "router_num_group": None,
        "router_topk_group": None,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.01,
        "output_router_logits": False,
        "qk_layernorm": args.qk_norm,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "partial_rotary_factor": 1.0,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": False,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "mask_token_id": args.mask_token_id,
        "torch_dtype": "bfloat16",
    }


def key_pairs(args: ModelArgs) -> list[tuple[str, str]]:
    per_block = [p for p in KEYS if "{i}" in p[0]] + (QK_NORM_KEYS if args.qk_norm else [])
    pairs = [p for p in KEYS if "{i}" not in p[0]]
    for i in range(args.n_layers):
        pairs += [(ck.format(i=i), nk.format(i=i)) for ck, nk in per_block]
        pairs += [(ck.format(i=i, e=e), nk.format(i=i, e=e)) for e in range(args.n_experts) for ck, nk in EXPERT_KEYS]
    return pairs
