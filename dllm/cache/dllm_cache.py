"""dLLM-Cache (Liu et al., 2025): adaptive feature caching with value-similarity updates.

Per layer, every position's attention output, FFN output and value vector are cached. Prompt
features are recomputed every ``prompt_interval`` (Kp) steps, response features every
``response_interval`` (Kr) steps. On other steps every response position still flows through
all layers: its value vector is recomputed (one projection) and the ``update_ratio`` (rho)
fraction with the lowest cosine similarity to its cached value is recomputed in full
(attention + FFN, K/V rewritten); the others reuse their cached attention and FFN outputs.
The prompt is read from the caches. Every response position gets a prediction each step
(from mixed fresh and cached features), so every masked position is eligible to unmask.
Unlike the reference code, padding is masked out of attention.

Accounting: a row computed in full counts one token-layer; a row whose value projection alone
is computed counts that projection's share of the layer's linear weights (wv / all linear
layers of the block: 1/13 for an MHA LLaMA block with ffn = 3 x dim), so that ``ideal_speedup``
stays the linear-layer bound it is for every other method.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllm.decoding.base import top_n_mask
from dllm.decoding.loop import pack
from dllm.models.transformer import Block, LayerHook, ModelArgs, put_rows, take_rows

from .base import ActiveRequest, CacheMethod, StepView, check_interval, register_cache


def value_share(args: ModelArgs) -> float:
    """The value projection's fraction of a row's linear-layer work in one block (from the shapes,
    so that it holds for dense and prepacked weights alike)."""
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    linear = args.dim * (q_width + 2 * kv_width) + q_width * args.dim + 3 * args.dim * args.ffn_dim
    return args.dim * kv_width / linear


class FeatureReuse(LayerHook):
    """One forward of dLLM-Cache: which rows to recompute per layer, cached features for the rest."""

    def __init__(self, cache: "DLLMCache", refresh_prompt: bool, refresh_response: bool) -> None:
        self.cache, self.refresh_prompt, self.refresh_response = cache, refresh_prompt, refresh_response

    def begin(self, rows: Tensor, rows_valid: Tensor) -> None:
        in_prompt = rows < self.cache.ctx.prompt_length
        refreshed = (in_prompt & self.refresh_prompt) | (~in_prompt & self.refresh_response)
        self.rows, self.rows_valid = rows, rows_valid
        self.always = rows_valid & refreshed
        self.candidates = rows_valid & ~in_prompt & ~refreshed
        self.n_updates = torch.ceil(self.candidates.sum(1) * self.cache.update_ratio).long()
        self.token_layers = 0

    def pick(self, layer: int, block: Block, x_norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.cache.features_of(layer, x_norm, block.attn.wv.out_features)
        value = block.attn.wv(x_norm)
        chosen = self.always
        if self.candidates.any():
            similarity = torch.cosine_similarity(value.float(), take_rows(features["v"], self.rows).float(), dim=-1)
            chosen = chosen | top_n_mask(-similarity.masked_fill(~self.candidates, float("inf")), self.n_updates)
        picked, picked_valid = pack(chosen)
        self.picked_positions = self.rows.gather(1, picked).masked_fill(~picked_valid, self.cache.ctx.length)
        picked_value = take_rows(value, picked)
        self.write(features["v"], picked_value)
        value_only = int((self.rows_valid & ~chosen).sum())
        self.token_layers += int(chosen.sum()) + value_only * value_share(block.attn.args)
        return picked, picked_valid, picked_value  # attention reuses them

    def merge(self, layer: int, part: str, picked: Tensor, picked_valid: Tensor, fresh: Tensor) -> Tensor:
        stored = self.cache.features[layer][part]
        self.write(stored, fresh)
        return take_rows(stored, self.rows)

    def write(self, stored: Tensor, fresh: Tensor) -> None:
        put_rows(stored, self.picked_positions, fresh)


@register_cache
class DLLMCache(CacheMethod):
    name = "dllm_cache"

    def __init__(self, prompt_interval: int = 50, response_interval: int = 7, update_ratio: float = 0.25) -> None:
        check_interval("prompt_interval", prompt_interval)
        check_interval("response_interval", response_interval)
        if not 0 <= update_ratio <= 1:
            raise ValueError(f"cache.update_ratio={update_ratio!r} must be in [0, 1]")
        self.prompt_interval, self.response_interval = prompt_interval, response_interval
        self.update_ratio = update_ratio

    def start(self, ctx) -> None:
        super().start(ctx)
        self.features: dict[int, dict[str, Tensor]] = {}

    def features_of(self, layer: int, like: Tensor, value_dim: int) -> dict[str, Tensor]:
        """The layer's feature caches (B, T + 1, ·), the last slot a trash slot for padding rows."""
        if layer not in self.features:
            B, T, dim = self.ctx.batch, self.ctx.length, like.shape[-1]
            make = lambda width: torch.zeros(B, T + 1, width, dtype=like.dtype, device=like.device)  # noqa: E731
            self.features[layer] = {"attn": make(dim), "ffn": make(dim), "v": make(value_dim)}
        return self.features[layer]

    def select(self, view: StepView) -> ActiveRequest:
        refresh_prompt = view.step % self.prompt_interval == 0
        refresh_response = view.step % self.response_interval == 0
        hook = FeatureReuse(self, refresh_prompt, refresh_response)
        if refresh_prompt and refresh_response:
            return ActiveRequest(full=True, layer_hook=hook)
        rows = torch.zeros_like(view.masked)
        rows[:, 0 if refresh_prompt else self.ctx.prompt_length :] = True
        return ActiveRequest(predict=view.masked, refresh=rows, layer_hook=hook)
