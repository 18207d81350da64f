"""dKV-Cache-Decode: delayed caching of decoded tokens (Ma et al., 2025).

Per block: steps 0 and 1 and every step with ``block_step % refresh_interval == 0`` are full
forwards that rewrite the cache. Other steps recompute every still-masked position (all blocks)
plus the positions decoded in the previous step, whose K/V are then computed once with their
real token (the one-step delay) and read from the cache until the next refresh.

``variant`` (for Dream in the paper, valid for both families):
  decode   the above;
  prefill  prompt K/V computed at step 0 only; the whole response recomputed every step;
  pd       prefill + decode: the prompt is never refreshed, the response follows ``decode``.

``shift_rule`` (variants decode and pd; the non-default rules need Dream's shifted logits):
  ours      the rule above, through Dream's shift: p is recomputed if p is masked, p was decoded
            in the previous step, or p + 1 is masked (p's hidden state predicts p + 1).
  un, un_right, right
            the rules of the authors' Dream code (its ``shift_type``; ``un`` is its default).
            With ``prev`` = the positions that were masked when the *previous* step began (still
            masked, or decoded in the previous step), a cached step recomputes p if
              un        prev[p + 1]             (the last position never: the reference rolls
                                                 it onto position 0, a prompt token)
              un_right  prev[p] or prev[p + 1]  (the last position as the one before it)
              right     prev[p]
            Only block steps with ``block_step % refresh_interval == 0`` are full forwards (pd:
            everything but the prompt minus its last position, the reference's prefill set);
            block step 1 is not: it recomputes p if p + 1 was masked at block step 0 (and the
            last position if it was masked), i.e. the last prompt position and the response.
            Every masked position's prediction is fresh: ``un`` and ``un_right`` recompute all
            predecessors of masked positions anyway; ``right`` may not (the reference then
            decodes those positions from -inf logits), so there the loop adds them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache

VARIANTS = ("decode", "prefill", "pd")
SHIFT_RULES = ("ours", "un", "un_right", "right")


def reference_active(prev_masked: Tensor, rule: str) -> Tensor:
    """Positions (B, T) the reference recomputes at a cached step under ``shift_type=rule``.

    ``prev_masked``: (B, T) bool, the positions masked when the previous step began.
    """
    active = torch.zeros_like(prev_masked)
    if rule == "un":
        active[:, :-1] = prev_masked[:, 1:]
    elif rule == "un_right":
        active[:, :-1] = prev_masked[:, :-1] | prev_masked[:, 1:]
        active[:, -1] = active[:, -2]
    elif rule == "right":
        active = prev_masked.clone()
    elif rule == "first":  # block step 1: the reference's initial cache set, the same for every rule
        active[:, :-1] = prev_masked[:, 1:]
        active[:, -1] = prev_masked[:, -1]
    else:
        raise ValueError(f"unknown reference rule {rule!r} (allowed: un, un_right, right, first)")
    return active


@register_cache
class DKVDecode(CacheMethod):
    name = "dkv_decode"

    def __init__(self, refresh_interval: int = 8, variant: str = "decode", shift_rule: str = "ours") -> None:
        check_interval("refresh_interval", refresh_interval)
        if variant not in VARIANTS:
            raise ValueError(f"cache.variant={variant!r} (allowed: {list(VARIANTS)})")
        if shift_rule not in SHIFT_RULES:
            raise ValueError(f"cache.shift_rule={shift_rule!r} (allowed: {list(SHIFT_RULES)})")
        if shift_rule != "ours" and variant == "prefill":
            raise ValueError(
                f"cache.shift_rule={shift_rule!r} applies to cache.variant=decode or pd only (the reference's "
                "dKV-Cache-Prefill has no shift_type); use shift_rule=ours with variant=prefill"
            )
        self.refresh_interval = refresh_interval
        self.variant = variant
        self.shift_rule = shift_rule

    def check_model(self, logit_shift: int) -> None:
        if self.shift_rule != "ours" and logit_shift != 1:
            raise ValueError(
                f"cache.shift_rule={self.shift_rule!r} is the dKV-Cache reference's Dream rule (shifted logits); "
                f"this model has logit_shift={logit_shift} (LLaDA), where only shift_rule=ours is defined"
            )

    def start(self, ctx) -> None:
        self.check_model(ctx.logit_shift)
        super().start(ctx)
        self.decoded_last_step = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool, device=ctx.device)
        self.prev_masked = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool, device=ctx.device)

    def select(self, view: StepView) -> ActiveRequest:
        ctx = self.ctx
        if view.step == 0:
            return ActiveRequest.everything()
        response = torch.zeros_like(view.masked)
        response[:, ctx.prompt_length :] = True
        if self.variant == "prefill":
            return ActiveRequest(predict=view.masked, refresh=response)
        block_step = view.plan.block_step
        if self.shift_rule != "ours":
            return self._select_reference(view, block_step)
        if block_step < 2 or block_step % self.refresh_interval == 0:
            if self.variant == "pd":
                return ActiveRequest(predict=view.masked, refresh=response)
            return ActiveRequest.everything()
        return ActiveRequest(predict=view.masked, refresh=view.masked | self.decoded_last_step)

    def _select_reference(self, view: StepView, block_step: int) -> ActiveRequest:
        if block_step % self.refresh_interval == 0:
            if self.variant == "decode":
                return ActiveRequest.everything()
            # pd: everything but the reference's prefill set (the prompt minus its last position).
            refresh = torch.zeros_like(view.masked)
            refresh[:, max(self.ctx.prompt_length - 1, 0) :] = True
            return ActiveRequest(predict=view.masked, refresh=refresh)
        rule = "first" if block_step == 1 else self.shift_rule
        return ActiveRequest(predict=view.masked, refresh=reference_active(self.prev_masked, rule))

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        self.decoded_last_step = outcome.transferred
        self.prev_masked = view.masked
