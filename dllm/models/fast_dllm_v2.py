"""Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_7B, _1.5B): Qwen2.5-Instruct weights and maths
unchanged (q/k/v biases, GQA, RoPE theta 1e6), run block-causally over blocks of 32 (config.json
``bd_size``), the token at position j predicted from hidden state j - 1 (shifted, as in AR decoding).

The published config.json (model_type ``Fast_dLLM_Qwen``) has Qwen2's fields plus ``bd_size``. It has no
mask-token field: the authors' code hard-codes ``|<MASK>|`` = 151665; a ``mask_token_id`` field, which
the tiny checkpoints write for their own tokenizer, is read when present.
"""
from __future__ import annotations

from .dream import KEYS, key_pairs  # noqa: F401  (Qwen2's key names, q/k/v biases: Dream's)
from .hf_config import check_supported, hf_shape
from .transformer import ModelArgs

MODEL_TYPE = "Fast_dLLM_Qwen"
# Qwen2.5's vocabulary: <|endoftext|> 151643 (bos; the tokenizer's pad), <|im_end|> 151645 (config eos
# and pad; the only stop token of the authors' generate), |<MASK>| 151665.
ENDOFTEXT, IM_END, MASK_TOKEN_ID = 151643, 151645, 151665
BD_SIZE = 32  # the attention block Fast-dLLM v2 was trained with

# config field -> the values the published modeling.py computes with at inference (None = absent / null).
SUPPORTED = {
    "hidden_act": (None, "silu"),
    "rope_scaling": (None,),
    "use_sliding_window": (None, False),
}


def describes(cfg: dict) -> bool:
    return cfg.get("model_type") == MODEL_TYPE


def args_from_config(cfg: dict) -> ModelArgs:
    check_supported(cfg, SUPPORTED, "Fast-dLLM v2")
    eos = cfg.get("eos_token_id", IM_END)
    return ModelArgs(
        family="fast_dllm_v2",
        **hf_shape(cfg, 32768),
        qkv_bias=True,
        mask_token_id=cfg.get("mask_token_id", MASK_TOKEN_ID),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        # The tokenizer's pad <|endoftext|> (= bos), which batch_sample writes after a row's EOS;
        # config.json's pad_token_id (151645 = eos) only names an nn.Embedding padding_idx.
        pad_token_id=ENDOFTEXT if cfg.get("bos_token_id") is None else cfg["bos_token_id"],  # null: the same token
        logit_shift=1,
        block_causal=True,
        trained_block_length=cfg.get("bd_size") or BD_SIZE,
    )


def config_from_args(args: ModelArgs) -> dict:
    """config.json fields as Fast_dLLM_v2_7B writes them (its auto_map, for remote code we never run, is
    left out), plus ``mask_token_id`` so that a tiny tokenizer's mask id is found."""
    return {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "model_type": MODEL_TYPE,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": args.pad_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.eos_token_id,
        "mask_token_id": args.mask_token_id,
        "bd_size": args.trained_block_length or BD_SIZE,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.n_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
