"""dLLM-Cache (Liu et al., 2025): adaptive feature caching with value-similarity updates.

Per layer, every position's attention output, FFN output and value vector are cached. Prompt
features are recomputed every ``prompt_interval`` (Kp) steps, response features every
``response_interval`` (Kr) steps. On other steps every response position still flows through
all layers: its value vector is recomputed (one projection) and the ``update_ratio`` (rho)
fraction with the lowest cosine similarity to its cached value (``update_rounding``: ceil(rho n)
of the n candidates, or floor as the reference; ``tie_break``: among equal similarities the earlier
position, a value that did not change counting exactly 1, or ``topk`` as the reference) is recomputed in full
(attention + FFN, K/V rewritten); the others reuse their cached attention and FFN outputs.
The prompt is read from the caches. Every response position gets a prediction each step
(from mixed fresh and cached features), so every masked position is eligible to unmask.
Unlike the reference code, padding is masked out of attention.

Two rules of the original code (``dllm_cache/hooks/cache_hook_LLaDA.py`` and ``_Dream.py`` of
maomaocun/dLLM-cache; the d2Cache authors' ``src/cache/dllm_cache.py`` does the same) that the
paper does not state, both on by default here and switchable to the rules we ran before:

``value_write``
    ``"all"`` (default, the reference): on a step that does not refresh the response, the fresh
    value vector of *every* response row, computed anyway for the similarity test, is written to
    the V cache, before the chosen rows' attention reads it, so those rows attend to fresh values
    of all response positions; the keys of the rows not chosen stay cached, and so does the
    prompt's V until the prompt is refreshed. The next similarity test then compares with the
    previous step's values. ``"recomputed"``: only the rows recomputed in full write K and V; the
    others keep the value of their last full recomputation (in attention and for the similarity).
``refresh_first_layer``
    ``True`` (default, the reference; its issue 6 discusses it): layer 0 recomputes every row of
    the forward in full at every step, without a similarity test. The reference recomputes the
    prompt rows at layer 0 too; we leave them out on steps that do not refresh the prompt, since
    nothing reads that work: the prompt's layer-0 keys and values depend on its embeddings alone
    (identical), and its layer-0 outputs feed only its own rows at deeper layers, which read their
    features from the caches until the next prompt refresh, which recomputes layer 0 anyway (a
    test checks that adding them changes no token). ``False``: layer 0 follows the same rule as
    every other layer.

Accounting: a row computed in full counts one token-layer (at layer 0 under
``refresh_first_layer`` every row of the forward); a row whose value projection alone is
computed counts that projection's share of the layer's linear weights (wv / all linear layers of
the block: 1/13 for an MHA LLaMA block with ffn = 3 x dim), so that ``ideal_speedup`` stays the
linear-layer bound it is for every other method. Writing a value to the cache costs no linear work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllm.decoding.base import top_n_mask
from dllm.decoding.loop import pack
from dllm.models.transformer import Block, LayerHook, ModelArgs, put_rows, take_rows

from .base import ActiveRequest, CacheMethod, StepView, check_interval, register_cache

VALUE_WRITES = ("all", "recomputed")
# How many of the n candidate rows are updated: ceil(rho * n) (ours: at least one whenever rho > 0) or
# floor (the reference's int(gen_length * rho); its candidates are the whole response).
UPDATE_ROUNDINGS = ("ceil", "floor")
# Among rows equally similar (above all those whose value did not change: their similarity is 1 up to
# rounding, which differs between CPUs) the earlier row is updated, or whichever torch.topk returns
# for the rounded similarities, as the reference does.
TIE_BREAKS = ("earlier", "topk")


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

    def begin(self, rows: Tensor, rows_valid: Tensor, required: Tensor) -> None:
        in_prompt = rows < self.cache.ctx.prompt_length
        refreshed = (in_prompt & self.refresh_prompt) | (~in_prompt & self.refresh_response) | required
        self.rows, self.rows_valid = rows, rows_valid
        self.always = rows_valid & refreshed
        # With rho = 0 nothing is chosen by similarity: no value is computed (nor written), as in the reference.
        self.candidates = rows_valid & ~in_prompt & ~refreshed & (self.cache.update_ratio > 0)
        n_candidates = self.candidates.sum(1)
        if self.cache.update_rounding == "floor":  # the reference's int(gen_length * rho), in Python's float64
            self.n_updates = torch.floor(n_candidates.double() * self.cache.update_ratio).long()
        else:
            self.n_updates = torch.ceil(n_candidates * self.cache.update_ratio).long()
        # Whose fresh values are written under value_write="all": the chosen rows and the candidates
        # (the chosen ones are always or candidates); every other row to the trash slot T.
        self.value_rows = self.always | self.candidates
        self.value_positions = rows.masked_fill(~self.value_rows, self.cache.ctx.length)
        self.token_layers = 0
        self.query_layers = torch.zeros(rows.shape[0], device=rows.device)
        self.store_values: tuple[Tensor, Tensor, Tensor] | None = None

    def pick(self, layer: int, block: Block, x_norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = self.cache
        features = cache.features_of(layer, x_norm, block.attn.wv.out_features)
        if layer == 0 and cache.refresh_first_layer:
            chosen, candidates = self.rows_valid, None
        else:
            chosen, candidates = self.always, self.candidates if self.candidates.any() else None
        value = None
        if candidates is not None:  # every row's value, for the similarity test (and the V cache)
            value = block.attn.wv(x_norm)
            cached = take_rows(features["v"], self.rows)
            work = torch.promote_types(value.dtype, torch.float32)  # bfloat16 -> float32, as the reference
            similarity = torch.cosine_similarity(value.to(work), cached.to(work), dim=-1)
            earlier = cache.tie_break == "earlier"
            if earlier:  # an unchanged value is exactly as similar as another, not 1 ± an ulp of rounding
                similarity = similarity.masked_fill((value == cached).all(-1), 1.0)
            score = -similarity.masked_fill(~candidates, float("inf"))
            chosen = chosen | top_n_mask(score, self.n_updates, stable=earlier)
        picked, picked_valid = pack(chosen)
        self.picked_positions = self.rows.gather(1, picked).masked_fill(~picked_valid, cache.ctx.length)
        if value is None:
            picked_value = block.attn.wv(take_rows(x_norm, picked))
        else:
            picked_value = take_rows(value, picked)
        self.store_values = None
        if value is not None and cache.value_write == "all":
            put_rows(features["v"], self.value_positions, value)
            # Into the K/V store too, before attention reads it (it then writes the picked rows' K/V).
            all_rows = torch.arange(value.shape[1], device=value.device).expand(value.shape[0], -1)
            self.store_values = (all_rows, self.value_rows, value)
        else:
            put_rows(features["v"], self.picked_positions, picked_value)
        self.token_layers += int(chosen.sum())
        self.query_layers += chosen.sum(1)
        if value is not None:
            self.token_layers += int((self.rows_valid & ~chosen).sum()) * value_share(block.attn.args)
        return picked, picked_valid, picked_value  # attention reuses them

    def values_to_store(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        return self.store_values

    def merge(self, layer: int, part: str, picked: Tensor, picked_valid: Tensor, fresh: Tensor) -> Tensor:
        stored = self.cache.features[layer][part]
        put_rows(stored, self.picked_positions, fresh)
        return take_rows(stored, self.rows)


@register_cache
class DLLMCache(CacheMethod):
    name = "dllm_cache"

    def __init__(
        self,
        prompt_interval: int = 50,
        response_interval: int = 7,
        update_ratio: float = 0.25,
        value_write: str = "all",
        refresh_first_layer: bool = True,
        update_rounding: str = "ceil",
        tie_break: str = "earlier",
    ) -> None:
        check_interval("prompt_interval", prompt_interval)
        check_interval("response_interval", response_interval)
        if not 0 <= update_ratio <= 1:
            raise ValueError(f"cache.update_ratio={update_ratio!r} must be in [0, 1]")
        if value_write not in VALUE_WRITES:
            raise ValueError(f"cache.value_write={value_write!r} must be one of {', '.join(VALUE_WRITES)}")
        if not isinstance(refresh_first_layer, bool):
            raise ValueError(f"cache.refresh_first_layer={refresh_first_layer!r} must be true or false")
        if update_rounding not in UPDATE_ROUNDINGS:
            raise ValueError(f"cache.update_rounding={update_rounding!r} must be one of {', '.join(UPDATE_ROUNDINGS)}")
        self.prompt_interval, self.response_interval = prompt_interval, response_interval
        self.update_ratio, self.value_write, self.refresh_first_layer = update_ratio, value_write, refresh_first_layer
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"cache.tie_break={tie_break!r} must be one of {', '.join(TIE_BREAKS)}")
        self.update_rounding, self.tie_break = update_rounding, tie_break

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
