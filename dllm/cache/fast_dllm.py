"""Fast-dLLM prefix and dual caches (Wu et al., 2025), block-wise.

At each block start a full forward rewrites the cache. Afterwards the active rows are the
current block plus everything after it (``prefix``: the prompt and earlier blocks are read from
the cache) or the current block only (``dual``: later blocks are cached too). Use with a block
decoder (block_length 32 in the paper). ``refresh_interval`` additionally forces a full forward
every that many steps of a block (off by default).

Dream (logit shift 1), ``dream_rows`` chooses the rows of the other steps of a block [lo, hi):

- ``ours`` (default): the block's K/V rows [lo, hi) (prefix: [lo, T)) plus the rows that predict
  its masked positions, i.e. row lo - 1 exactly while position lo is still masked.
- ``reference``: the rows of the d2Cache repository's PrefixCache (``use_dual``), the region
  shifted left by one: [lo - 1, hi - 1) (prefix: [lo - 1, T - 1)), fixed at the block's first
  step (row lo - 1 stays active after position lo is decoded). Only these rows' K/V are
  rewritten, so the block's last position (prefix: the sequence's last) keeps the K/V of the
  block's first, full forward until the next block start.

On LLaDA (no shift) both rules are the same rows, the block region, so ``reference`` is accepted
and identical to ``ours``. (NVlabs' own Dream code computes the unshifted region and commits the
block's first position at the block-start forward: that is ``dream_rows=ours`` with
``decoding=dream decoding.block_length=... decoding.first_token=commit``.)

Block-diffusion models (block-causal attention; the loop keeps finished blocks' K/V exact and
never computes later blocks): no block-start refresh is needed, and the rows are those of the
attention block(s) holding the rows that predict the step's masked positions:

- ``prefix``: every row of those blocks each step: the **exact prefix cache**, and the authors' own
  generation (SDAR/TraDo ``generate.py``, Fast-dLLM v2 without ``use_block_cache``); identical
  tokens to ``none``.
- ``dual``: Fast-dLLM v2's block cache (``use_block_cache=True``): the whole block when it is
  first computed or when the window's (sub-block's) first position is still masked, otherwise
  only the window's rows, attending to the K/V the rest of the block had when last computed.
  With a window of the whole block (SDAR/TraDo, LLaDA2.0) it is the same as ``prefix``.
  ``block_refresh``: ``row`` (default) decides that per row, so a row of a batch decodes as it
  does alone; ``batch`` as Fast-dLLM v2's code does, for the whole batch: every row recomputes its
  block when any row's window starts masked (its rows then depend on the others in the batch).
"""
from __future__ import annotations

import torch

from dllm.decoding.base import DecodeContext
from dllm.decoding.layout import blocks_of, shift_to_computing

from .base import ActiveRequest, CacheMethod, StepView, check_interval, register_cache

DREAM_ROWS = ("ours", "reference")
BLOCK_REFRESH = ("row", "batch")


class BlockCache(CacheMethod):
    #: True: recompute everything after the current block too (prefix); False: the block only (dual).
    recompute_suffix: bool
    block_causal = True

    def __init__(self, refresh_interval: int | None = None, dream_rows: str = "ours") -> None:
        check_interval("refresh_interval", refresh_interval, allow_none=True)
        if not isinstance(dream_rows, str) or dream_rows not in DREAM_ROWS:
            raise ValueError(f"cache.dream_rows={dream_rows!r} (allowed: {list(DREAM_ROWS)})")
        self.refresh_interval = refresh_interval
        self.dream_rows = dream_rows

    def check_attention(self, block_causal: bool) -> None:
        if block_causal and (self.refresh_interval or self.dream_rows != "ours"):
            raise ValueError(f"cache={self.name}: cache.refresh_interval={self.refresh_interval!r} / cache.dream_rows="
                             f"{self.dream_rows!r} have no meaning on a block-diffusion model, whose finished blocks "
                             "are exact (allowed: null / ours)")

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        if ctx.attention_block:
            self.computed_in_full = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool, device=ctx.device)

    def select(self, view: StepView) -> ActiveRequest:
        if self.ctx.attention_block:
            return self.select_in_block(view)
        block_step = view.plan.block_step
        if block_step == 0 or (self.refresh_interval and block_step % self.refresh_interval == 0):
            return ActiveRequest.everything()
        lo, hi = view.plan.window
        T = view.masked.shape[1]
        end = T if self.recompute_suffix else hi
        region = torch.zeros_like(view.masked)
        region[:, lo:end] = True
        predict = view.masked & region
        shift = self.ctx.logit_shift
        if self.dream_rows == "reference" and shift:
            # The region moved left by the shift, whatever is still masked; it covers every
            # row that predicts a position of [lo, end), so ``predict`` adds nothing to it.
            rows = torch.zeros_like(view.masked)
            rows[:, lo - shift : end - shift] = True
            return ActiveRequest(predict=predict, refresh=rows)
        return ActiveRequest(predict=predict, refresh=region)

    def select_in_block(self, view: StepView) -> ActiveRequest:
        lo, hi = view.plan.window
        predict = torch.zeros_like(view.masked)
        predict[:, lo:hi] = view.masked[:, lo:hi]
        computing = shift_to_computing(predict, self.ctx.logit_shift)
        blocks = blocks_of(computing, self.ctx.attention_block)
        if self.recompute_suffix:
            return ActiveRequest(predict=predict, refresh=blocks)
        in_full = (blocks & ~self.computed_in_full).any(1) | view.masked[:, lo]
        if self.block_refresh == "batch":  # rows with nothing to predict have no blocks: they stay idle
            in_full = in_full.any().expand_as(in_full)
        self.computed_in_full |= blocks & in_full[:, None]
        window = torch.zeros_like(view.masked)
        window[:, lo:hi] = predict.any(1, keepdim=True)  # rows with nothing to predict compute nothing
        return ActiveRequest(predict=predict, refresh=torch.where(in_full[:, None], blocks, window | computing))


@register_cache
class PrefixCache(BlockCache):
    name = "prefix"
    recompute_suffix = True


@register_cache
class DualCache(BlockCache):
    name = "dual"
    recompute_suffix = False

    def __init__(self, refresh_interval: int | None = None, dream_rows: str = "ours",
                 block_refresh: str = "row") -> None:
        super().__init__(refresh_interval, dream_rows)
        if not isinstance(block_refresh, str) or block_refresh not in BLOCK_REFRESH:
            raise ValueError(f"cache.block_refresh={block_refresh!r} (allowed: {list(BLOCK_REFRESH)})")
        self.block_refresh = block_refresh

    def check_attention(self, block_causal: bool) -> None:
        super().check_attention(block_causal)
        if not block_causal and self.block_refresh != "row":
            raise ValueError(f"cache=dual: cache.block_refresh={self.block_refresh!r} is for block-diffusion models "
                             "(Fast-dLLM v2's block cache); a bidirectional model's blocks start with a full forward "
                             "of the whole batch (allowed: row)")
