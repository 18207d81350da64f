"""Streaming-dLLM's attenuation-guided suffix pruning (Xiao et al., 2026, arXiv 2601.17917) on a
Fast-dLLM block cache.

While block [lo, hi) is decoded, the masked suffix [hi, T) is pruned to the ``window`` positions
right after the block plus (``tail``) the sequence's last position, which keeps the final RoPE
position in view; when the suffix is no longer than ``window`` it is kept whole. Pruned positions
are outside the step's key set and never computed: no row attends to them, at any layer, for the
whole block. Everything else is the base cache on the kept positions (RoPE positions unchanged):

- block start (and every ``refresh_interval`` steps of a block): every kept position is recomputed;
- ``prefix`` (the paper's, default): then the block and the kept suffix are recomputed each step,
  the prompt and earlier blocks read from the cache;
- ``dual`` (the authors' Dream code, ``dual_cache=True``): then only the block is recomputed.

On Dream the block's first position is predicted from row lo - 1 while it is masked, as in
``cache=prefix`` / ``dual`` with ``dream_rows=ours``. With ``window: null`` (or a suffix that fits
the window) nothing is pruned and the requests are exactly the base cache's.

Why the rule is fixed rather than measured: the paper motivates it by attention decaying with
distance into the suffix (its Fig. 2), but both the paper (Eq. 7) and the authors' code
(``deterministic_window_tail_sampler``, ``tail_keep=1``) keep a fixed nearest window and the last
position; no attention is read at run time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ActiveRequest, CacheMethod, StepView, check_interval, register_cache

BASES = ("prefix", "dual")


def kept_suffix(length: int, hi: int, window: int | None, tail: bool) -> list[int]:
    """Positions of the suffix [hi, length) that stay attended (the authors' window-and-tail rule)."""
    suffix = list(range(hi, length))
    if window is None or len(suffix) <= window:
        return suffix
    return suffix[:window] + (suffix[-1:] if tail else [])


@register_cache
class StreamingCache(CacheMethod):
    name = "streaming"

    def __init__(self, window: int | None = 32, tail: bool = True, base: str = "prefix",
                 refresh_interval: int | None = None) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise ValueError(f"cache.window={window!r} must be an integer >= 0 (suffix positions kept) "
                             "or null (no pruning)")
        if not isinstance(tail, bool):
            raise ValueError(f"cache.tail={tail!r} must be true or false")
        if not isinstance(base, str) or base not in BASES:
            raise ValueError(f"cache.base={base!r} (allowed: {list(BASES)})")
        check_interval("refresh_interval", refresh_interval, allow_none=True)
        self.window, self.tail, self.base = window, tail, base
        self.refresh_interval = refresh_interval

    def keys(self, masked: Tensor, hi: int) -> Tensor | None:
        """(B, T) bool: everything before the suffix plus its kept positions; None if nothing is pruned."""
        T = masked.shape[1]
        suffix = kept_suffix(T, hi, self.window, self.tail)
        if len(suffix) == T - hi:
            return None
        keep = torch.zeros_like(masked)
        keep[:, :hi] = True
        keep[:, suffix] = True
        return keep

    def select(self, view: StepView) -> ActiveRequest:
        lo, hi = view.plan.window
        keys = self.keys(view.masked, hi)
        block_step = view.plan.block_step
        if block_step == 0 or (self.refresh_interval and block_step % self.refresh_interval == 0):
            # Pruned positions are not computed either: the loop leaves rows outside ``refresh`` alone.
            return ActiveRequest.everything() if keys is None else ActiveRequest(refresh=keys, keys=keys)
        region = torch.zeros_like(view.masked)
        region[:, lo : view.masked.shape[1] if self.base == "prefix" else hi] = True
        if keys is not None:
            region &= keys
        block = torch.zeros_like(view.masked)
        block[:, lo:hi] = True
        # Only the block's masked positions can be committed; on Dream their rows are j - 1, which
        # adds row lo - 1 (a cached prefix row) while position lo is masked.
        return ActiveRequest(predict=view.masked & block, refresh=region, keys=keys)
