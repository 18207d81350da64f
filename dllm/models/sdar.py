"""SDAR (JetLM/SDAR-*-Chat) and TraDo (Gen-Verse/TraDo-*-Instruct, RL-trained from SDAR): Qwen3 weights
and maths unchanged, run block-causally (bidirectional inside a block of 4, causal across blocks), the
token at position j predicted from hidden state j (no shift).

Qwen3 as the published ``modeling_sdar.py`` computes it: per-head RMSNorm of queries and keys (over
head_dim, before RoPE), head_dim from config (128, also where hidden / heads is not: 2560 / 32 in the
4B), no linear biases, GQA. The published config.json (model_type ``sdar``) has Qwen3's fields; the
copies in JetAstra/SDAR add ``block_size`` (4) and ``mask_token_id`` (151669, ``<|MASK|>``), the copies
on the Hub do not, so both are optional here.
"""
from __future__ import annotations

from .hf_config import check_supported, hf_shape, qwen_key_pairs
from .transformer import ModelArgs

MODEL_TYPE = "sdar"
# Qwen's vocabulary: <|endoftext|> 151643 (bos = eos in config.json, and pad), <|im_start|> 151644,
# <|im_end|> 151645; <|MASK|> 151669 is hard-coded in every SDAR / TraDo script.
ENDOFTEXT, IM_END, MASK_TOKEN_ID = 151643, 151645, 151669
BLOCK_SIZE = 4  # the attention block SDAR / TraDo were trained with (config.json block_size)

KEYS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.ffn.w_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.ffn.w_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.ffn.w_down.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]

# config field -> the values modeling_sdar.py computes with and this implementation supports
# (None = absent / null). attention_bias would add biases to o_proj too, which the Transformer lacks.
SUPPORTED = {
    "hidden_act": (None, "silu"),
    "attention_bias": (None, False),
    "rope_scaling": (None,),
    "use_sliding_window": (None, False),
}


def describes(cfg: dict) -> bool:
    return cfg.get("model_type") == MODEL_TYPE


def args_from_config(cfg: dict) -> ModelArgs:
    check_supported(cfg, SUPPORTED, "SDAR")
    # <|endoftext|>; published configs may leave bos_token_id null, which means the same token
    endoftext = ENDOFTEXT if cfg.get("bos_token_id") is None else cfg["bos_token_id"]
    return ModelArgs(
        family="sdar",
        **hf_shape(cfg, 32768),
        qkv_bias=False,
        mask_token_id=cfg.get("mask_token_id", MASK_TOKEN_ID),
        # config.json's eos is <|endoftext|>, the end of a document. Every SDAR / TraDo checkpoint is a
        # chat model whose turn ends with <|im_end|>: generation_config.json's stop list is
        # [<|im_end|>, <|endoftext|>], and the first of them to appear is <|im_end|> (training pads the
        # answer's last block with <|endoftext|> only after "<|im_end|>\n"). The loop stops on one id, so
        # it is <|im_end|>, the same distance after <|endoftext|> in every Qwen vocabulary (and in the
        # tiny tokenizer, which keeps their order); <|endoftext|> still cuts a response (tokenization).
        eos_token_id=endoftext + IM_END - ENDOFTEXT,
        pad_token_id=endoftext,  # generation_config.json pad; config.json has no pad_token_id
        logit_shift=0,
        qk_norm=True,
        explicit_head_dim=cfg.get("head_dim") or 0,
        block_causal=True,
        trained_block_length=cfg.get("block_size") or BLOCK_SIZE,  # absent from the Hub's copies
    )


def config_from_args(args: ModelArgs) -> dict:
    """config.json fields as JetAstra/SDAR's copy of SDAR-4B-Chat writes them (its auto_map, for remote
    code we never run, and its training-only switches are left out)."""
    if args.eos_token_id != args.pad_token_id + IM_END - ENDOFTEXT:
        raise ValueError(f"SDAR's eos is <|im_end|>, {IM_END - ENDOFTEXT} ids after <|endoftext|> (pad): got "
                         f"eos {args.eos_token_id}, pad {args.pad_token_id}")
    return {
        "architectures": ["SDARForCausalLM"],
        "model_type": MODEL_TYPE,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": args.pad_token_id,
        "eos_token_id": args.pad_token_id,
        "block_size": args.trained_block_length or BLOCK_SIZE,
        "mask_token_id": args.mask_token_id,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.n_layers,
        "use_cache": False,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    }


def key_pairs(args: ModelArgs) -> list[tuple[str, str]]:
    return qwen_key_pairs(KEYS, args)
