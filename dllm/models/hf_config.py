"""Helpers shared by the families' readers of a Hugging Face config.json."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .transformer import ModelArgs


def check_supported(cfg: dict, supported: dict[str, tuple], family: str, why: str = "") -> None:
    """Refuse a config.json whose ``field`` is not among ``supported[field]`` (None: absent / null)."""
    for field, allowed in supported.items():
        if cfg.get(field) not in allowed:
            raise ValueError(f"{family} config: {field}={cfg[field]!r} is not supported (allowed: {list(allowed)}{why})")


def hf_shape(cfg: dict, max_positions: int, ffn_field: str = "intermediate_size", rope_theta: float = 1e6,
             norm_eps: float = 1e-6) -> dict:
    """The ModelArgs fields that Hugging Face config.json files spell alike (Qwen-style: Dream, SDAR,
    Fast-dLLM v2; OLMoE-style: LLaDA-MoE). ``ffn_field`` names the FFN width; ``max_positions``,
    ``rope_theta`` and ``norm_eps`` are the family's defaults where the file leaves them out."""
    # transformers 5 moved rope_theta into rope_parameters; the published configs have it flat.
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", rope_theta)
    return dict(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_dim=cfg[ffn_field],
        vocab_size=cfg["vocab_size"],
        rope_theta=float(rope_theta),
        norm_eps=float(cfg.get("rms_norm_eps", norm_eps)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_seq_len=cfg.get("max_position_embeddings", max_positions),
    )


def qwen_key_pairs(keys: list[tuple[str, str]], args: ModelArgs) -> list[tuple[str, str]]:
    """(checkpoint, native) names of a Qwen-style checkpoint: ``keys`` with ``{i}`` per layer, and no
    ``lm_head.weight`` when the head is tied to the embedding."""
    pairs = [p for p in keys if "{i}" not in p[0]]
    if args.tie_embeddings:
        pairs = [p for p in pairs if p[0] != "lm_head.weight"]
    per_block = [p for p in keys if "{i}" in p[0]]
    for i in range(args.n_layers):
        pairs += [(ck.format(i=i), nk.format(i=i)) for ck, nk in per_block]
    return pairs
