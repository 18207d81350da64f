"""Fast-dLLM prefix and dual caches (Wu et al., 2025), block-wise.

At each block start a full forward rewrites the cache. Afterwards the active rows are the
current block plus everything after it (``prefix``: the prompt and earlier blocks are read from
the cache) or the current block only (``dual``: later blocks are cached too). Use with a block
decoder (block_length 32 in the paper). ``refresh_interval`` additionally forces a full forward
every that many steps of a block (off by default).
"""
from __future__ import annotations

import torch

from .base import ActiveRequest, CacheMethod, StepView, check_interval, register_cache


class BlockCache(CacheMethod):
    #: True: recompute everything after the current block too (prefix); False: the block only (dual).
    recompute_suffix: bool

    def __init__(self, refresh_interval: int | None = None) -> None:
        check_interval("refresh_interval", refresh_interval, allow_none=True)
        self.refresh_interval = refresh_interval

    def select(self, view: StepView) -> ActiveRequest:
        block_step = view.plan.block_step
        if block_step == 0 or (self.refresh_interval and block_step % self.refresh_interval == 0):
            return ActiveRequest.everything()
        lo, hi = view.plan.window
        region = torch.zeros_like(view.masked)
        region[:, lo : None if self.recompute_suffix else hi] = True
        return ActiveRequest(predict=view.masked & region, refresh=region)


@register_cache
class PrefixCache(BlockCache):
    name = "prefix"
    recompute_suffix = True


@register_cache
class DualCache(BlockCache):
    name = "dual"
    recompute_suffix = False
