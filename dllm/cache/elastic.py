"""Elastic-Cache (Nguyen-Tri, Ranjan, Shen, 2025, arXiv:2510.14973): attention-aware, layer-aware refresh.

Step 0 is a full forward. Afterwards each step's forward holds every known position (prompt and
decoded tokens) and a *sliding window*: the ``window`` (beta) leftmost masked positions the decoder may
commit. Masked positions outside the window are not computed at all: their K/V from the last time
they were computed stay in the store and every row attends to them (the paper's off-window MASK
cache). The window, the positions whose token changed since the previous forward (decoded, re-masked,
filled at EOS), the positions a decoder fixed in advance and every row that predicts a masked position
(Dream: j - 1) are the *query rows*: computed at every layer. The other known rows reuse their cached
per-layer attention/FFN outputs (their hidden state is rebuilt from them, so it is exactly the one they
had when last computed) until the drift test fires.

Drift test, per layer l and batch row: the most-attended known token T_l = argmax_k of the attention
the window rows pay to key k, summed over the window rows (head-averaged attention). The next step
compares the attention those same window rows (the previous window: all of them are query rows again)
pay to the same token T_l with what they paid the step before, by cosine similarity sigma_l over the
rows. If sigma_l < gamma, every row of the forward is recomputed from layer l + 1 to the last layer
(the first layer whose test fires sets the boundary; deeper tests are not needed but T_l is still
updated). ``gamma = 1`` refreshes every layer of every step (no similarity can exceed 1): with a window
covering the response this is ``cache=none``.

The model gives a layer hook no attention rows, so the hook computes the test rows' attention itself:
it keeps a copy of the stored keys (written for the rows it picks, from the same normed input the
attention projects) and projects the test rows' queries. The duplicated key and query projections are
counted in ``token_layers`` as their share of the layer's linear work.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dllm.decoding.loop import pack
from dllm.models.transformer import Block, LayerHook, ModelArgs, apply_rope, put_rows, rope_cos_sin, take_rows

from .base import ActiveRequest, CacheMethod, StepView, register_cache


def projection_share(args: ModelArgs, width: int) -> float:
    """A (dim x width) projection's fraction of a row's linear-layer work in one block."""
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    linear = args.dim * (q_width + 2 * kv_width) + q_width * args.dim + 3 * args.dim * args.ffn_dim
    return args.dim * width / linear


def leftmost(masked: Tensor, width: int) -> Tensor:
    """(B, T) bool: each row's ``width`` leftmost True entries of ``masked``."""
    return masked & (masked.long().cumsum(1) <= width)


def sliding_window(view: StepView, width: int) -> Tensor:
    """(B, T) bool: each row's ``width`` leftmost masked positions (the paper's M_t[:beta]), plus the
    leftmost masked positions of the decoder's commit window up to the step's largest unmask count,
    so that a decoder whose window is not the leftmost one can always commit what it schedules."""
    lo, hi = view.plan.commit_window
    committable = torch.zeros_like(view.masked)
    committable[:, lo:hi] = view.masked[:, lo:hi]
    return leftmost(view.masked, width) | leftmost(committable, int(view.plan.n_transfer.max()))


#: boundary of a row whose drift test has not fired (yet) in this forward: no layer refreshes it.
NO_REFRESH = torch.iinfo(torch.long).max


def drift_boundary(similarity: Tensor, gamma: float, boundary: Tensor, layer: int) -> Tensor:
    """New per-row boundary: rows not yet refreshing whose similarity at ``layer`` fell below gamma
    refresh every layer after it (boundary = ``layer``)."""
    fired = (similarity < gamma) & (boundary == NO_REFRESH)
    return torch.where(fired, torch.full_like(boundary, layer), boundary)


class ElasticStep(LayerHook):
    """One forward: query rows at every layer, the other rows from the boundary layer on."""

    def __init__(self, cache: "ElasticCache", queries: Tensor, window: Tensor, refresh_all: bool) -> None:
        self.cache, self.queries, self.window, self.refresh_all = cache, queries, window, refresh_all

    def begin(self, rows: Tensor, rows_valid: Tensor, required: Tensor) -> None:
        cache, T = self.cache, self.cache.ctx.length
        B = rows.shape[0]
        pad = torch.zeros(B, 1, dtype=torch.bool, device=rows.device)
        at = lambda mask: torch.cat([mask, pad], 1).gather(1, rows) & rows_valid  # noqa: E731
        # Every row whose prediction the decoder may read must be computed at every layer.
        predicts_masked = torch.cat([cache.masked, pad], 1).gather(1, (rows + cache.ctx.logit_shift).clamp(max=T))
        self.rows, self.rows_valid = rows, rows_valid
        self.query_rows = (at(self.queries) | (predicts_masked & rows_valid) | required)
        self.window_rows = at(self.window)  # T_l is chosen from the current window's attention
        self.history_rows = at(cache.prev_window) if cache.prev_window is not None else torch.zeros_like(rows_valid)
        # The rows whose attention the hook forms (query rows: the window, or decoded since).
        self.test_rows, self.test_valid = pack(self.window_rows | self.history_rows)
        self.boundary = torch.full((B,), -1 if self.refresh_all else NO_REFRESH, dtype=torch.long, device=rows.device)
        self.token_layers = 0.0
        self.query_layers = torch.zeros(B, dtype=torch.float32, device=rows.device)

    def pick(self, layer: int, block: Block, x_norm: Tensor) -> tuple[Tensor, Tensor, None]:
        cache = self.cache
        chosen = self.query_rows | (self.rows_valid & (layer > self.boundary)[:, None])
        picked, picked_valid = pack(chosen)
        self.picked_positions = self.rows.gather(1, picked).masked_fill(~picked_valid, cache.ctx.length)
        n_chosen = chosen.sum(1).float()
        self.query_layers += n_chosen
        self.token_layers += float(n_chosen.sum())
        if cache.gamma < 1:  # gamma = 1 never tests: nothing to track
            self.test_drift(layer, block, x_norm, picked, n_chosen)
        return picked, picked_valid, None

    def test_drift(self, layer: int, block: Block, x_norm: Tensor, picked: Tensor, n_chosen: Tensor) -> None:
        """Keep the key copy current, form the test rows' attention, set the boundary and T_l."""
        cache, args = self.cache, block.attn.args
        cache.write_keys(layer, block, take_rows(x_norm, picked), self.picked_positions)
        positions = self.rows.gather(1, self.test_rows).masked_fill(~self.test_valid, cache.ctx.length)
        attention = cache.attention(layer, block, take_rows(x_norm, self.test_rows), positions)
        if not self.refresh_all and cache.prev_window is not None:
            in_history = self.history_rows.gather(1, self.test_rows) & self.test_valid
            similarity = cache.similarity(layer, attention, positions, in_history)
            self.boundary = drift_boundary(similarity, cache.gamma, self.boundary, layer)
        cache.track(layer, attention, positions, self.window_rows.gather(1, self.test_rows) & self.test_valid)
        # The duplicated projections: keys of the computed rows, queries of the test rows.
        n_tested = self.test_valid.sum(1).float()
        self.query_layers += n_tested
        kv_width, q_width = args.n_kv_heads * args.head_dim, args.n_heads * args.head_dim
        self.token_layers += float(n_chosen.sum()) * projection_share(args, kv_width) + float(
            n_tested.sum()) * projection_share(args, q_width)

    def merge(self, layer: int, part: str, picked: Tensor, picked_valid: Tensor, fresh: Tensor) -> Tensor:
        stored = self.cache.features_of(layer, fresh)[part]
        put_rows(stored, self.picked_positions, fresh)
        return take_rows(stored, self.rows)


@register_cache
class ElasticCache(CacheMethod):
    name = "elastic"

    def __init__(self, gamma: float = 0.9, window: int = 16) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise ValueError(f"cache.gamma={gamma!r} must be a number in [0, 1] (1 = refresh every layer every step)")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"cache.window={window!r} must be an integer >= 1")
        self.gamma, self.window = float(gamma), window

    def start(self, ctx) -> None:
        super().start(ctx)
        self.features: dict[int, dict[str, Tensor]] = {}
        self.keys: dict[int, Tensor] = {}
        self.tracked: dict[int, Tensor] = {}  # per layer (B,): T_l of the last forward
        self.prev_column: dict[int, Tensor] = {}  # per layer (B, T + 1): what its window paid T_l
        self.prev_x: Tensor | None = None
        self.prev_window: Tensor | None = None
        pad = torch.zeros(ctx.batch, 1, dtype=torch.bool, device=ctx.device)
        self.key_ok = torch.cat([ctx.real, pad], 1)  # real keys; the trash slot T never
        self.rope_positions = torch.cat([(ctx.real.long().cumsum(1) - 1).clamp(min=0), pad.long()], 1)

    def select(self, view: StepView) -> ActiveRequest:
        real, masked = self.ctx.real, view.masked
        scheduled = view.plan.scheduled if view.plan.scheduled is not None else torch.zeros_like(masked)
        window = sliding_window(view, self.window)
        if self.prev_x is None:  # step 0: a full forward fills every layer's caches
            queries, refresh_all, forward = real, True, real
        else:
            queries, refresh_all = window | scheduled | (view.x != self.prev_x), self.gamma >= 1
            # Off-window masked positions stay out of the forward: their cached K/V is what rows attend.
            forward = real & ~(masked & ~(window | scheduled))
        self.masked, self.known, self.current_window = masked, real & ~masked, window
        self.prev_x = view.x.clone()
        # Decoding runs over the window at every step, the full forward of step 0 too (the authors'
        # generate_with_elastic_cache takes step 0's logits at the window only).
        return ActiveRequest(predict=window, refresh=forward, commit=window | scheduled,
                             layer_hook=ElasticStep(self, queries, window, refresh_all))

    def observe(self, view: StepView, outcome) -> None:
        self.prev_window = self.current_window

    # ------------------------------------------------------------------ per-layer state of the hook
    def features_of(self, layer: int, like: Tensor) -> dict[str, Tensor]:
        """The layer's attention/FFN output caches (B, T + 1, dim), slot T a trash slot."""
        if layer not in self.features:
            shape = (self.ctx.batch, self.ctx.length + 1, like.shape[-1])
            self.features[layer] = {part: torch.zeros(shape, dtype=like.dtype, device=like.device) for part in ("attn", "ffn")}
        return self.features[layer]

    def rope(self, block: Block, positions: Tensor, x: Tensor, which: str) -> Tensor:
        """Rotated queries or keys (B, heads, S, hd) of rows x (B, S, dim) at slots ``positions``."""
        attn, args = block.attn, block.attn.args
        B, S, _ = x.shape
        heads = args.n_heads if which == "q" else args.n_kv_heads
        y = (attn.wq if which == "q" else attn.wk)(x).view(B, S, heads, args.head_dim)
        if args.qk_norm:
            y = (attn.q_norm if which == "q" else attn.k_norm)(y)
        cos, sin = rope_cos_sin(self.rope_positions.gather(1, positions), args.rotary_dim, args.rope_theta, x.dtype)
        return apply_rope(y.transpose(1, 2), cos, sin)

    def write_keys(self, layer: int, block: Block, x: Tensor, positions: Tensor) -> None:
        """The copy of the stored keys, written for the rows this layer computes."""
        if layer not in self.keys:
            a = block.attn.args
            self.keys[layer] = torch.zeros(self.ctx.batch, a.n_kv_heads, self.ctx.length + 1, a.head_dim,
                                           dtype=x.dtype, device=x.device)
        put_rows(self.keys[layer].transpose(1, 2), positions, self.rope(block, positions, x, "k").transpose(1, 2))

    def attention(self, layer: int, block: Block, x: Tensor, positions: Tensor) -> Tensor:
        """Head-averaged attention (B, S, T + 1) of rows x at ``positions`` over the stored keys."""
        a = block.attn.args
        B, S, _ = x.shape
        groups = a.n_heads // a.n_kv_heads
        q = self.rope(block, positions, x, "q").reshape(B, a.n_kv_heads, groups * S, a.head_dim)
        scores = q @ self.keys[layer].transpose(2, 3) / math.sqrt(a.head_dim)
        scores = scores.masked_fill(~self.key_ok[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32)
        return probs.view(B, a.n_kv_heads, groups, S, -1).mean((1, 2))

    def similarity(self, layer: int, attention: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
        """(B,) cosine similarity of the attention the previous window's rows pay to token T_l now
        and at the previous step (1 where a row has no such rows: nothing to compare)."""
        now = self.column(attention, self.tracked[layer], positions, rows)
        # Only rows present at both steps are compared (a previous-window row may have left the forward).
        present = torch.zeros_like(now, dtype=torch.bool).scatter(1, positions.masked_fill(~rows, now.shape[1] - 1), rows)
        before = self.prev_column[layer] * present
        norms = now.norm(dim=1) * before.norm(dim=1)
        cosine = (now * before).sum(1) / norms.clamp(min=torch.finfo(now.dtype).tiny)
        return torch.where(norms > 0, cosine, torch.ones_like(cosine))

    def track(self, layer: int, attention: Tensor, positions: Tensor, rows: Tensor) -> None:
        """T_l: the known token the window rows attend to most (summed over rows); remember the
        attention each window row pays it, for the next step's test."""
        received = (attention * rows[..., None]).sum(1)
        received = received.masked_fill(~torch.cat([self.known, torch.zeros_like(self.known[:, :1])], 1), float("-inf"))
        self.tracked[layer] = received.argmax(1)
        self.prev_column[layer] = self.column(attention, self.tracked[layer], positions, rows)

    def column(self, attention: Tensor, token: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
        """(B, T + 1) float64: attention of each of ``rows`` (at its position) to ``token``, 0 elsewhere."""
        B, S, K = attention.shape
        paid = attention.gather(2, token[:, None, None].expand(B, S, 1)).squeeze(2).double() * rows
        column = torch.zeros(B, K, dtype=torch.float64, device=attention.device)
        return column.scatter_add(1, positions.masked_fill(~rows, K - 1), paid)
