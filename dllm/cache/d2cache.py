"""d²Cache: dual adaptive caching (Jiang et al., 2025).

Step 0 is a full forward. After each step the next forward recomputes S1 | S_new | S2:
  S1    the top-k still-masked positions by confidence x certainty density D(i), from a
        per-position confidence cache refreshed for every masked position recomputed;
  S_new the positions decoded this step (recomputed once with their real token);
  S2    the smallest set of other (known) positions holding fraction p of the
        attention-rollout importance of this step's forward.
``refresh_interval`` (off by default, as in the paper) forces periodic full forwards.
S1 holds max(k, tokens unmasked this step) positions, so a schedule committing more than k
tokens per step still finds enough freshly predicted candidates, and it is drawn from the
decoder's window (the positions it may commit this step): with a block decoder the paper's
whole-response rule would pick masked positions of later blocks that this step cannot commit
and leave masks behind. With one block (certainty-prior decoding, the paper's setting) the
window is the whole response and the rule is the paper's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllm.decoding.density import DENSITY_VARIANTS, certainty_density

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache


def rollout_importance(attention: list[Tensor], rows: Tensor, rows_valid: Tensor, start: Tensor) -> Tensor:
    """Column sums c = 1ᵀ W_L ⋯ W_1 of the attention rollout, in O(L |Q| T).

    W_l is the row-normalised (E_l + I), E_l the identity with the active rows replaced by the
    head-averaged attention A_l (B, A, T). Inactive rows of W_l are unit rows, so
    vᵀ W_l = v with active entries halved + sum over active i of (v_i / 2) A_l[i].
    ``start`` (B, T) is the all-ones vector restricted to the rows that count (real tokens).
    rows (B, A) index positions; padded entries hold T and are ignored.
    """
    B, T = start.shape
    v = torch.cat([start.float(), torch.zeros(B, 1, device=start.device)], dim=1)
    for attn in reversed(attention):
        half = v.gather(1, rows) * rows_valid / 2
        v = v.scatter(1, rows, half)
        v[:, :T] += (half[:, None, :] @ attn[..., :T].float()).squeeze(1)
        v[:, T] = 0
    return v[:, :T]


def nucleus(importance: Tensor, candidates: Tensor, p: float) -> Tensor:
    """Smallest set of candidates whose normalised importance reaches p (at least one per row)."""
    score = importance.masked_fill(~candidates, 0)
    score = score / score.sum(1, keepdim=True).clamp_min(1e-30)
    # Non-candidates sort last (-1), so the forced first pick is a candidate even if all weigh 0.
    ordered, order = score.masked_fill(~candidates, -1.0).sort(1, descending=True)
    mass_before = ordered.clamp_min(0).cumsum(1) - ordered.clamp_min(0)
    keep = (mass_before < p) & ordered.gt(0)
    keep[:, 0] |= candidates.any(1)
    return torch.zeros_like(candidates).scatter(1, order, keep) & candidates


@register_cache
class D2Cache(CacheMethod):
    name = "d2cache"
    needs_attention = True

    def __init__(self, k: int = 32, p: float = 0.1, sigma: float = 10.0, density: str = "sum",
                 refresh_interval: int | None = None) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"cache.k={k!r} must be an integer >= 1")
        if not 0 < p <= 1:
            raise ValueError(f"cache.p={p!r} must be in (0, 1]")
        if sigma <= 0:
            raise ValueError(f"cache.sigma={sigma!r} must be > 0")
        if density not in DENSITY_VARIANTS:
            raise ValueError(f"cache.density={density!r} (allowed: {list(DENSITY_VARIANTS)})")
        check_interval("refresh_interval", refresh_interval, allow_none=True)
        self.k, self.p, self.sigma, self.density = k, p, sigma, density
        self.refresh_interval = refresh_interval

    def check(self, decoder) -> None:
        if not decoder.confidence_is_probability:
            raise ValueError(
                f"cache=d2cache ranks masked positions by confidence x density; decoding={decoder.name!r}"
                f"{'/' + decoder.alg if hasattr(decoder, 'alg') else ''} gives no probability-like confidence "
                "(use certainty_prior, low_confidence, or dream with alg=maskgit_plus/topk_margin)"
            )

    def start(self, ctx) -> None:
        super().start(ctx)
        self.confidence = torch.zeros(ctx.batch, ctx.length, dtype=torch.float64, device=ctx.device)
        self.refresh_next = None

    def select(self, view: StepView) -> ActiveRequest:
        if self.refresh_next is None or (self.refresh_interval and view.step % self.refresh_interval == 0):
            return ActiveRequest.everything()
        # Stage 1 is chosen here, not in observe(), so that it covers at least the tokens this
        # step will unmask, where it may unmask them (see the module docstring).
        ctx, masked = self.ctx, view.masked
        known = ctx.real & ~masked
        stage1 = (self.confidence * certainty_density(known, ctx.real, self.sigma, self.density)).float()
        lo, hi = view.plan.window
        committable = torch.zeros_like(masked)
        committable[:, lo:hi] = masked[:, lo:hi]
        stage1 = stage1.masked_fill(~committable, float("-inf"))
        width = min(max(self.k, int(view.plan.n_transfer.max())), stage1.shape[1])
        top = stage1.topk(width, dim=1)
        s1 = torch.zeros_like(masked).scatter(1, top.indices, torch.isfinite(top.values))
        return ActiveRequest(predict=s1, refresh=self.refresh_next)

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        ctx = self.ctx
        fresh = ~outcome.confidence.isnan()
        self.confidence = torch.where(fresh, outcome.confidence, self.confidence)
        known = ctx.real & ~(view.masked & ~outcome.transferred)
        importance = rollout_importance(outcome.attention, outcome.rows, outcome.rows_valid, ctx.real)
        s2 = nucleus(importance, known & ~outcome.transferred, self.p)
        self.refresh_next = outcome.transferred | s2
