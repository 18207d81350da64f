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
decoder's commit window (the positions it may commit this step): with a block decoder the paper's
whole-response rule would pick masked positions of later blocks that this step cannot commit
and leave masks behind. With one block (certainty-prior decoding, the paper's setting) the
window is the whole response and the rule is the paper's.

Reference-code rules. The authors' code (github.com/Kamichanw/d2Cache, src/cache/d2cache.py,
src/utils/common.py, src/generation/vanilla.py), which produced the paper's numbers, departs from
the paper's text in six places. Each is an option; the default is the paper's reading:
  (a) ``stage2_mass``       reach: smallest set whose mass reaches p | within: the top candidate,
                            then every next one while the cumulative mass stays <= p.
  (b) ``stage2_candidates`` known: S2 is drawn from known positions | all: from every real
                            position except S_new and the rows computing S1 (for Dream: j - 1 of
                            each j in S1 inside the response; the last prompt row stays a
                            candidate), still-masked ones included; the normalising mass is
                            over those candidates.
  (c) ``stage1_confidence`` refreshed | step0: the confidence cache keeps the first prediction of
                            each position (step 0's full forward when the window is the whole
                            response) and is never updated after it.
  (e) ``dream_first_row``   or: S2 may pick the last prompt row P-1 | overwrite: on Dream, row
                            P-1 is recomputed exactly when the first response position is in S1
                            (an S2 pick of it is dropped). No effect on LLaDA.
  (f) ``tie_break``         earlier: among equal S1 scores the earlier position is taken (the paper
                            leaves ties open) | topk: whichever ``torch.topk`` returns, the
                            reference's call. Its order among ties depends on the row's width, so a
                            left-padded row could choose otherwise than alone: under a block
                            decoder with k < block_length, a block's positions never predicted
                            before its first step all score 0.
``reference_rules=true`` makes every option left null take the reference value; an option given
explicitly wins (reference_rules=true + stage2_mass=reach is the reference minus rule (a)).
Rules (b) and (e) depend on which row computes a position's prediction: the decode context's
``logit_shift`` (1 for Dream).
Rule (d) of the reference (its "recomputed this step" decoding filter is a no-op, so a masked
position whose logits were not recomputed - zero logits there: confidence 1/V, token id 0 - can
be committed) is a loop rule, not expressible through :class:`ActiveRequest`; it is not emulated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllm.decoding.base import top_n_mask
from dllm.decoding.density import DENSITY_VARIANTS, certainty_density, check_sigma

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache

#: option -> (the paper's reading = default, the reference code's rule)
RULES: dict[str, tuple[str, str]] = {
    "stage2_mass": ("reach", "within"),
    "stage2_candidates": ("known", "all"),
    "stage1_confidence": ("refreshed", "step0"),
    "dream_first_row": ("or", "overwrite"),
    "tie_break": ("earlier", "topk"),
}


def resolve_rules(reference_rules: bool = False, **options: str | None) -> dict[str, str]:
    """The value of every rule option: an explicit value wins, null follows ``reference_rules``."""
    if not isinstance(reference_rules, bool):
        raise ValueError(f"cache.reference_rules={reference_rules!r} must be true or false")
    unknown = set(options) - set(RULES)
    if unknown:
        raise ValueError(f"unknown d2cache rule option(s) {sorted(unknown)} (allowed: {list(RULES)})")
    resolved = {}
    for name, (paper, reference) in RULES.items():
        value = options.get(name)
        if value is None:
            value = reference if reference_rules else paper
        elif value not in (paper, reference):
            raise ValueError(
                f"cache.{name}={value!r} (allowed: {[paper, reference]}, or null to follow cache.reference_rules)"
            )
        resolved[name] = value
    return resolved


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


def nucleus(importance: Tensor, candidates: Tensor, p: float, mass: str = "reach") -> Tensor:
    """Top candidates by importance, normalised over the candidates (at least one per row).

    ``reach`` (the paper): the smallest set whose mass reaches p (zero-importance candidates are
    never needed). ``within`` (the reference code): the top candidate, then every next one while
    the cumulative mass stays <= p.
    """
    if mass not in RULES["stage2_mass"]:
        raise ValueError(f"mass={mass!r} (allowed: {list(RULES['stage2_mass'])})")
    score = importance.masked_fill(~candidates, 0)
    score = score / score.sum(1, keepdim=True).clamp_min(1e-30)
    # Non-candidates sort last (-1), so the forced first pick is a candidate even if all weigh 0.
    ordered, order = score.masked_fill(~candidates, -1.0).sort(1, descending=True)
    weight = ordered.clamp_min(0)
    if mass == "reach":
        keep = (weight.cumsum(1) - weight < p) & ordered.gt(0)
    else:
        keep = weight.cumsum(1) <= p
    keep[:, 0] |= candidates.any(1)
    return torch.zeros_like(candidates).scatter(1, order, keep) & candidates


@register_cache
class D2Cache(CacheMethod):
    name = "d2cache"
    needs_attention = True

    def __init__(self, k: int = 32, p: float = 0.1, sigma: float = 10.0, density: str = "sum",
                 refresh_interval: int | None = None, reference_rules: bool = False,
                 stage2_mass: str | None = None, stage2_candidates: str | None = None,
                 stage1_confidence: str | None = None, dream_first_row: str | None = None,
                 tie_break: str | None = None) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"cache.k={k!r} must be an integer >= 1")
        if not 0 < p <= 1:
            raise ValueError(f"cache.p={p!r} must be in (0, 1]")
        sigma = check_sigma("cache.sigma", sigma)
        if density not in DENSITY_VARIANTS:
            raise ValueError(f"cache.density={density!r} (allowed: {list(DENSITY_VARIANTS)})")
        check_interval("refresh_interval", refresh_interval, allow_none=True)
        rules = resolve_rules(reference_rules, stage2_mass=stage2_mass, stage2_candidates=stage2_candidates,
                              stage1_confidence=stage1_confidence, dream_first_row=dream_first_row,
                              tie_break=tie_break)
        self.k, self.p, self.sigma, self.density = k, p, sigma, density
        self.refresh_interval = refresh_interval
        self.reference_rules = reference_rules
        self.stage2_mass = rules["stage2_mass"]
        self.stage2_candidates = rules["stage2_candidates"]
        self.stage1_confidence = rules["stage1_confidence"]
        self.dream_first_row = rules["dream_first_row"]
        self.tie_break = rules["tie_break"]

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
        self.predicted = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool, device=ctx.device)
        self.importance: Tensor | None = None  # rollout importance of the last forward (B, T)
        self.transferred: Tensor | None = None  # positions decoded in the last step (B, T)
        self.shift = ctx.logit_shift

    def select(self, view: StepView) -> ActiveRequest:
        if self.importance is None or (self.refresh_interval and view.step % self.refresh_interval == 0):
            return ActiveRequest.everything()
        # Stage 1 is chosen here, not in observe(), so that it covers at least the tokens this
        # step will unmask, where it may unmask them (see the module docstring).
        ctx, masked = self.ctx, view.masked
        known = ctx.real & ~masked
        stage1 = (self.confidence * certainty_density(known, ctx.real, self.sigma, self.density)).float()
        lo, hi = view.plan.commit_window
        committable = torch.zeros_like(masked)
        committable[:, lo:hi] = masked[:, lo:hi]
        stage1 = stage1.masked_fill(~committable, float("-inf"))
        width = min(max(self.k, int(view.plan.n_transfer.max())), stage1.shape[1])
        s1 = top_n_mask(stage1, torch.full_like(view.plan.n_transfer, width), stable=self.tie_break == "earlier")
        return ActiveRequest(predict=s1, refresh=self.transferred | self.stage2(s1, known))

    def stage2(self, s1: Tensor, known: Tensor) -> Tensor:
        """S2 of the next forward given its S1 and the known positions (after the last step)."""
        P = self.ctx.prompt_length
        if self.stage2_candidates == "known":
            candidates = known & ~self.transferred
        else:  # every real position but S_new and the rows that compute S1 (inside the response)
            s1_rows = s1.clone()
            if self.shift:
                s1_rows.zero_()
                s1_rows[:, P:-self.shift] = s1[:, P + self.shift:]
            candidates = self.ctx.real & ~self.transferred & ~s1_rows
        s2 = nucleus(self.importance, candidates, self.p, self.stage2_mass)
        if self.dream_first_row == "overwrite" and self.shift == 1 and P > 0:
            # Row P-1 stays active only through S1 (the loop computes the first response
            # position's prediction there); the reference assigns it instead of OR-ing it.
            s2[:, P - 1] = False
        return s2

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        fresh = ~outcome.confidence.isnan()
        if self.stage1_confidence == "step0":
            fresh &= ~self.predicted  # keep each position's first prediction (step 0's in one block)
            self.predicted |= fresh
        self.confidence = torch.where(fresh, outcome.confidence, self.confidence)
        self.importance = rollout_importance(outcome.attention, outcome.rows, outcome.rows_valid, self.ctx.real)
        self.transferred = outcome.transferred
