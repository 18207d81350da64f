"""No caching: every step is a full forward (the baseline every method is compared with)."""
from __future__ import annotations

from .base import ActiveRequest, CacheMethod, StepView, register_cache


@register_cache
class NoCache(CacheMethod):
    name = "none"
    full_every_step = True

    def select(self, view: StepView) -> ActiveRequest:
        return ActiveRequest.everything()
