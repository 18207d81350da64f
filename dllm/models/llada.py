"""LLaDA (GSAI-ML/LLaDA-8B-*): OLMo-style config and key names, mapped onto the shared Transformer."""
from __future__ import annotations

from .transformer import ModelArgs

MODEL_TYPE = "llada"
# Gen-Verse/MMaDA-8B-* subclass LLaDA's model class (MMadaModelLM(LLaDAModelLM), same key names) under
# their own model_type; for text generation they are LLaDA checkpoints with a larger embedding.
MODEL_TYPES = (MODEL_TYPE, "mmada")

# (checkpoint key, native key); "{i}" is the block index.
KEYS = [
    ("model.transformer.wte.weight", "tok_embeddings.weight"),
    ("model.transformer.blocks.{i}.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.transformer.blocks.{i}.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.transformer.blocks.{i}.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.transformer.blocks.{i}.attn_out.weight", "layers.{i}.attn.wo.weight"),
    ("model.transformer.blocks.{i}.ff_proj.weight", "layers.{i}.ffn.w_gate.weight"),
    ("model.transformer.blocks.{i}.up_proj.weight", "layers.{i}.ffn.w_up.weight"),
    ("model.transformer.blocks.{i}.ff_out.weight", "layers.{i}.ffn.w_down.weight"),
    ("model.transformer.blocks.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight"),
    ("model.transformer.blocks.{i}.ff_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.transformer.ln_f.weight", "norm.weight"),
    ("model.transformer.ff_out.weight", "output.weight"),
]
QKV_BIAS_KEYS = [
    ("model.transformer.blocks.{i}.q_proj.bias", "layers.{i}.attn.wq.bias"),
    ("model.transformer.blocks.{i}.k_proj.bias", "layers.{i}.attn.wk.bias"),
    ("model.transformer.blocks.{i}.v_proj.bias", "layers.{i}.attn.wv.bias"),
]


def describes(cfg: dict) -> bool:
    """Whether a config.json is dense LLaDA's (LLaDA-MoE shares the model_type; see llada_moe)."""
    return cfg.get("model_type") in MODEL_TYPES and "num_experts" not in cfg


def args_from_config(cfg: dict) -> ModelArgs:
    unsupported = {
        "block_type": ("llama",),
        "activation_type": ("silu",),
        "layer_norm_type": ("rms",),
    }
    for field, allowed in unsupported.items():
        if cfg.get(field, allowed[0]) not in allowed:
            raise ValueError(f"LLaDA config: {field}={cfg[field]!r} is not supported (allowed: {list(allowed)})")
    # OLMo-style switches LLaDA's checkpoints set one way (RoPE on; no ALiBi, logit scaling, attention
    # layer norm or q/k/v clipping); the other way they would silently run as something else here.
    switches = {"rope": True, "alibi": False, "scale_logits": False, "attention_layer_norm": False}
    for field, value in switches.items():
        if field in cfg and cfg[field] != value:
            raise ValueError(f"LLaDA config: {field}={cfg[field]!r} is not supported (allowed: {value!r})")
    if cfg.get("clip_qkv") is not None:
        raise ValueError(f"LLaDA config: clip_qkv={cfg['clip_qkv']!r} is not supported (allowed: null)")
    if cfg.get("weight_tying", False):
        raise ValueError("LLaDA config: weight_tying=true is not supported (LLaDA has an untied LM head)")
    if cfg.get("include_bias", False):
        raise ValueError("LLaDA config: include_bias=true is not supported (LLaDA has no linear biases)")
    return ModelArgs(
        family="llada",
        dim=cfg["d_model"],
        n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"],
        n_kv_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
        ffn_dim=cfg["mlp_hidden_size"],
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(cfg.get("include_qkv_bias", False)),
        tie_embeddings=False,
        max_seq_len=cfg.get("max_sequence_length", 4096),
        mask_token_id=cfg.get("mask_token_id", 126336),
        eos_token_id=cfg.get("eos_token_id", 126081),
        pad_token_id=cfg.get("pad_token_id", 126081),
        logit_shift=0,
    )


def config_from_args(args: ModelArgs) -> dict:
    """config.json fields as the published LLaDA checkpoints write them."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": MODEL_TYPE,
        "d_model": args.dim,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "n_layers": args.n_layers,
        "mlp_hidden_size": args.ffn_dim,
        "mlp_ratio": args.ffn_dim // args.dim or 1,
        "rope": True,
        "rope_theta": args.rope_theta,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "embedding_size": args.vocab_size,
        "max_sequence_length": args.max_seq_len,
        "weight_tying": False,
        "include_bias": False,
        "include_qkv_bias": args.qkv_bias,
        "layer_norm_type": "rms",
        "block_type": "llama",
        "activation_type": "silu",
        "attention_layer_norm": False,
        "alibi": False,
        "scale_logits": False,
        "mask_token_id": args.mask_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "torch_dtype": "bfloat16",
    }


def key_pairs(args: ModelArgs) -> list[tuple[str, str]]:
    per_block = [p for p in KEYS if "{i}" in p[0]] + (QKV_BIAS_KEYS if args.qkv_bias else [])
    pairs = [p for p in KEYS if "{i}" not in p[0]]
    for i in range(args.n_layers):
        pairs += [(ck.format(i=i), nk.format(i=i)) for ck, nk in per_block]
    return pairs
