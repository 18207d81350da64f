"""dKV-Cache-Decode: delayed caching of decoded tokens (Ma et al., 2025).

Per block: steps 0 and 1 and every step with ``block_step % refresh_interval == 0`` are full
forwards that rewrite the cache. Other steps recompute every still-masked position (all blocks)
plus the positions decoded in the previous step, whose K/V are then computed once with their
real token (the one-step delay) and read from the cache until the next refresh.

``variant`` (for Dream in the paper, valid for both families):
  decode   the above;
  prefill  prompt K/V computed at step 0 only; the whole response recomputed every step;
  pd       prefill + decode: the prompt is never refreshed, the response follows ``decode``.
"""
from __future__ import annotations

import torch

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache

VARIANTS = ("decode", "prefill", "pd")


@register_cache
class DKVDecode(CacheMethod):
    name = "dkv_decode"

    def __init__(self, refresh_interval: int = 8, variant: str = "decode") -> None:
        check_interval("refresh_interval", refresh_interval)
        if variant not in VARIANTS:
            raise ValueError(f"cache.variant={variant!r} (allowed: {list(VARIANTS)})")
        self.refresh_interval = refresh_interval
        self.variant = variant

    def start(self, ctx) -> None:
        super().start(ctx)
        self.decoded_last_step = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool, device=ctx.device)

    def select(self, view: StepView) -> ActiveRequest:
        ctx = self.ctx
        if view.step == 0:
            return ActiveRequest.everything()
        response = torch.zeros_like(view.masked)
        response[:, ctx.prompt_length :] = True
        if self.variant == "prefill":
            return ActiveRequest(predict=view.masked, refresh=response)
        block_step = view.plan.block_step
        if block_step < 2 or block_step % self.refresh_interval == 0:
            if self.variant == "pd":
                return ActiveRequest(predict=view.masked, refresh=response)
            return ActiveRequest.everything()
        return ActiveRequest(predict=view.masked, refresh=view.masked | self.decoded_last_step)

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        self.decoded_last_step = outcome.transferred
