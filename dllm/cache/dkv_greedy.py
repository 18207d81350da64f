"""dKV-Cache-Greedy: aggressive, short-lived caching around the tokens about to be decoded.

Needs a decoder whose order is fixed before the forward (``decoding=random``, as in the paper).
Every step with ``block_step % refresh_interval == 0`` is a full forward that rebuilds the whole
cache. Otherwise only these rows are recomputed (everything else stays stale):
  - the positions decoded in the previous step (now with their real token),
  - the positions scheduled to be decoded in this step,
  - up to ``window`` still-masked neighbours of each scheduled position, taken in the order
    -1, +1, -2, +2, ... up to distance ``window`` (may leave the block, not the response).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache


def window_neighbours(scheduled: Tensor, masked: Tensor, window: int, lo: int) -> Tensor:
    """(B, T) bool: for each scheduled position, its first ``window`` masked neighbours in [lo, T)."""
    B, T = scheduled.shape
    taken = torch.zeros(B, T, dtype=torch.long, device=scheduled.device)  # per scheduled source
    chosen = torch.zeros_like(scheduled)
    for distance in range(1, window + 1):
        for offset in (-distance, distance):
            src = torch.zeros_like(scheduled)  # sources whose neighbour at `offset` is a masked position
            if offset < 0:
                src[:, -offset:] = masked[:, :offset]
            else:
                src[:, :-offset] = masked[:, offset:]
            src[:, : max(lo - offset, 0)] = False  # the neighbour must lie in the response
            take = scheduled & src & (taken < window)
            taken += take.long()
            if offset < 0:
                chosen[:, :offset] |= take[:, -offset:]
            else:
                chosen[:, offset:] |= take[:, :-offset]
    return chosen


@register_cache
class DKVGreedy(CacheMethod):
    name = "dkv_greedy"

    def __init__(self, refresh_interval: int = 2, window: int = 4) -> None:
        check_interval("refresh_interval", refresh_interval)
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"cache.window={window!r} must be an integer >= 0")
        self.refresh_interval = refresh_interval
        self.window = window

    def check(self, decoder) -> None:
        if not decoder.order_known_in_advance:
            raise ValueError(
                f"cache=dkv_greedy needs the decoding order before each forward; decoding={decoder.name!r} "
                "cannot give it (use decoding=random)"
            )

    def start(self, ctx) -> None:
        super().start(ctx)
        self.decoded_last_step = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool, device=ctx.device)

    def select(self, view: StepView) -> ActiveRequest:
        if view.plan.block_step % self.refresh_interval == 0:
            return ActiveRequest.everything()
        scheduled = view.plan.scheduled
        neighbours = window_neighbours(scheduled, view.masked, self.window, self.ctx.prompt_length)
        return ActiveRequest(predict=scheduled, refresh=self.decoded_last_step | neighbours)

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        self.decoded_last_step = outcome.transferred
