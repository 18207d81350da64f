"""No caching: every step is a full forward (the baseline every method is compared with).

On a block-diffusion model "everything" is every position up to the end of the current block
(later blocks cannot change it), recomputed every step, as LLaDA2.0's own ``generate`` does."""
from __future__ import annotations

from .base import ActiveRequest, CacheMethod, StepView, register_cache


@register_cache
class NoCache(CacheMethod):
    name = "none"
    full_every_step = True
    block_causal = True

    def select(self, view: StepView) -> ActiveRequest:
        return ActiveRequest.everything()
