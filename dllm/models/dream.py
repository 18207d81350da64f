"""Dream (Dream-org/Dream-v0-*-7B): Qwen2-style config and key names, run non-causally, shifted logits."""
from __future__ import annotations

from .hf_config import hf_shape, qwen_key_pairs
from .transformer import ModelArgs

MODEL_TYPE = "Dream"

KEYS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.wq.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.wk.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.wv.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.ffn.w_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.ffn.w_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.ffn.w_down.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]


def describes(cfg: dict) -> bool:
    return cfg.get("model_type") == MODEL_TYPE


def args_from_config(cfg: dict) -> ModelArgs:
    eos = cfg.get("eos_token_id", 151643)
    return ModelArgs(
        family="dream",
        **hf_shape(cfg, 131072),
        qkv_bias=True,
        mask_token_id=cfg.get("mask_token_id", 151666),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=cfg.get("pad_token_id", 151643),
        logit_shift=1,
    )


def config_from_args(args: ModelArgs) -> dict:
    """config.json fields as the published Dream checkpoints write them."""
    return {
        "architectures": ["DreamModel"],
        "model_type": MODEL_TYPE,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "rope_theta": args.rope_theta,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "mask_token_id": args.mask_token_id,
        "pad_token_id": args.pad_token_id,
        "eos_token_id": args.eos_token_id,
        "bos_token_id": args.eos_token_id,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
    }


def key_pairs(args: ModelArgs) -> list[tuple[str, str]]:
    return qwen_key_pairs(KEYS, args)

