"""Prophet (Li et al., 2025, arXiv 2508.19982): early commit once the answer has converged.

Base rule: LLaDA's low-confidence remasking (:class:`~dllm.decoding.llada.BlockDecoder`: blocks of
``block_length`` left to right, ``steps`` split evenly, the most probable predictions first).
Before committing, each step measures, per batch row, the confidence gap

    g = mean over the region's masked positions with a fresh prediction of (top-1 - top-2 logit)

(raw logits over the whole vocabulary, [MASK] included, as the authors' ``generate_earlyexit.py``
takes ``topk(logits, 2)``; not probabilities). At loop step s (0-based) the progress is
(s + 1) / steps (the authors increment ``global_step`` before the check) and the threshold is
``early_threshold`` (7.5) while progress < 0.33, ``mid_threshold`` (5.0) while < 0.67, else
``late_threshold`` (2.5). When g >= threshold the row goes "all in": every masked position of
its response with a fresh prediction is committed in this step with its current prediction
(the authors fill all remaining masks with this forward's argmax x0), the later blocks included.

The region: ``answer_start: null`` (default) = every masked position of the response. The
authors monitor a fixed answer slot instead (``answer_length`` = 5 positions starting two after a
forced "The answer is" prefix that their lm-eval harness writes into the response; without that
prefix they never exit early). ``answer_start: k`` restricts the region to response positions
[k, k + answer_length) (cut at the end); there, positions already decoded do not count (the loop
computes no logits for them), and once none of the slot is masked the answer is written and the
criterion holds. A region with masked positions but no fresh prediction among them does not
trigger. This departs from the authors' code, which averages the gap over all the slot's
positions, decoded ones included (its forwards compute logits everywhere): on a tiny trained LLaDA
the two give different tokens in about a quarter of the settings tried.

``window`` (which positions get logits each step, i.e. the plan's window):

- ``rest`` (default): from the current block's start to the end of the response, so the gap sees
  the later blocks and the all-in step commits them from the same forward, as in the authors'
  code (a full forward). Before the trigger only the current block is eligible. ``cache=prefix``
  and ``dkv_decode`` recompute every masked position anyway; ``cache=dual`` then recomputes the
  rest of the response too (it follows the window), i.e. behaves as ``prefix``.
- ``block``: the current block only (what ``dual`` keeps cheap); the gap is over the block's
  masked positions and the all-in step commits the block, the later blocks one forward later.

Positions left masked by an all-in step for lack of a fresh prediction (a later block under
``window=block``, or a cache method that recomputed only part of the window) are scheduled for
the next step (``plan.scheduled``, which the loop always recomputes) and all committed then;
decoding ends as soon as no masked position is left, so the forward count is data-dependent
(at most ``steps`` + 1).

Batches: the plan's window is the batch's, so a step that commits some row's leftovers computes
logits up to the end of the response for every row. Each row's gap and commits still count only
what it would see alone (its own window and its own leftovers), so with full forwards
(``cache=none``) a row decodes as in a batch of one; a cache method that recomputes its window
(``dual``) refreshes the other rows' later blocks in that step too, which can move a near-tie.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import DecodeContext, StepPlan, llada_transfer_counts, on_positions, register_decoder, top_n_mask
from .llada import BlockDecoder

#: progress bounds of the early / mid / late phases (the authors' ``should_early_exit``)
PHASE_BOUNDS = (0.33, 0.67)
WINDOWS = ("rest", "block")


def _threshold(key: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"decoding.{key}={value!r} must be a number >= 0 (a top-1 - top-2 logit gap; "
                         "inf never triggers in that phase)")
    return float(value)


@register_decoder
class Prophet(BlockDecoder):
    name = "prophet"

    def __init__(self, steps: int, block_length: int | None = None, early_threshold: float = 7.5,
                 mid_threshold: float = 5.0, late_threshold: float = 2.5, answer_start: int | None = None,
                 answer_length: int = 5, window: str = "rest", temperature: float = 0.0) -> None:
        super().__init__(steps, block_length, temperature)
        self.thresholds = tuple(_threshold(k, v) for k, v in (
            ("early_threshold", early_threshold), ("mid_threshold", mid_threshold), ("late_threshold", late_threshold)))
        if answer_start is not None and (not isinstance(answer_start, int) or isinstance(answer_start, bool)
                                         or answer_start < 0):
            raise ValueError(f"decoding.answer_start={answer_start!r} must be an integer >= 0 (a response offset) "
                             "or null (every masked position)")
        if not isinstance(answer_length, int) or isinstance(answer_length, bool) or answer_length < 1:
            raise ValueError(f"decoding.answer_length={answer_length!r} must be an integer >= 1")
        if window not in WINDOWS:
            raise ValueError(f"decoding.window={window!r} (allowed: {list(WINDOWS)})")
        self.answer_start, self.answer_length, self.window = answer_start, answer_length, window

    def check(self, gen_length: int) -> None:
        super().check(gen_length)
        if self.answer_start is not None and self.answer_start >= gen_length:
            raise ValueError(f"decoding.answer_start={self.answer_start} must be < gen_length={gen_length}")

    def threshold(self, step: int) -> float:
        progress = (step + 1) / self.steps
        early, mid, late = self.thresholds
        return early if progress < PHASE_BOUNDS[0] else mid if progress < PHASE_BOUNDS[1] else late

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        B, T, P = ctx.batch, ctx.length, ctx.prompt_length
        self.all_in = torch.zeros(B, dtype=torch.bool, device=ctx.device)  # rows that went all in
        self.region = torch.zeros(B, T, dtype=torch.bool, device=ctx.device)
        lo = P if self.answer_start is None else P + self.answer_start
        hi = T if self.answer_start is None else min(T, lo + self.answer_length)
        self.region[:, lo:hi] = True
        self.region &= ctx.real
        self.step, self.block_window = 0, (P, T)
        self.gap: Tensor | None = None

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        P, T = self.ctx.prompt_length, self.ctx.length
        response = torch.zeros_like(masked)
        response[:, P:] = True
        left = masked & response
        if not left.any():
            return None
        self.step = step
        leftover = left & self.all_in[:, None]  # rows already all in: commit what the last step could not
        if step < self.steps:
            block, block_step = divmod(step, self.steps_per_block)
            lo = P + block * self.block
            hi = lo + self.block
            if block_step == 0:
                self.counts = llada_transfer_counts(masked[:, lo:hi].sum(1), self.steps_per_block)
            n_transfer = torch.where(self.all_in, 0, self.counts[:, block_step])
        else:  # only all-in rows can have masked positions after the schedule
            if not leftover.any():
                return None  # nothing this decoder can still commit (the loop reports what is left)
            block, block_step = self.ctx.gen_length // self.block - 1, self.steps_per_block
            lo = hi = T
            n_transfer = torch.zeros_like(self.all_in, dtype=torch.long)
        self.block_window = (lo, hi)
        window_lo, window_hi = lo, (T if self.window == "rest" else hi)
        # What each row would see alone: its window and its own leftovers. The plan's window is the
        # batch's, widened for any row's leftovers; a row's gap and commits use its own view only.
        self.own_view = leftover.clone()
        self.own_view[:, window_lo:window_hi] = True
        scheduled = None
        if leftover.any():
            scheduled = leftover
            n_transfer = n_transfer + leftover.sum(1)
            window_lo = min(window_lo, int(leftover.any(0).nonzero()[0]))
            window_hi = T
        # The schedule's tokens come from the block (leftovers are scheduled, hence fresh anyway).
        return StepPlan((window_lo, window_hi), n_transfer, block, block_step, scheduled, commit=(lo, hi))

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if positions is None:
            raise ValueError("decoding=prophet needs the positions of the logits rows (the loop passes them)")
        tokens, confidence = super().propose(logits, positions)
        top2 = logits.double().topk(2, dim=-1).values  # over the whole vocabulary, [MASK] included
        self.gap, self.positions = top2[..., 0] - top2[..., 1], positions
        return tokens, confidence

    def fresh_gaps(self, confidence: Tensor) -> Tensor:
        """(B, T) top-1 - top-2 logit gap at every freshly predicted position (NaN elsewhere)."""
        return on_positions(self.gap, self.positions, confidence.shape[1])

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        gaps = self.fresh_gaps(confidence)
        fresh = ~confidence.isnan() & masked & self.own_view
        region = self.region & masked
        counted = region & fresh
        n = counted.sum(1)
        mean_gap = torch.where(counted, gaps, 0.0).sum(1) / n.clamp(min=1)
        holds = torch.where(region.any(1), (n > 0) & (mean_gap >= self.threshold(self.step)), True)
        self.all_in = self.all_in | holds
        lo, hi = self.block_window
        in_block = torch.zeros_like(masked)
        in_block[:, lo:hi] = True
        eligible = fresh & (in_block | self.all_in[:, None])
        return confidence.masked_fill(~eligible, float("-inf"))

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        chosen = top_n_mask(score, plan.n_transfer)
        return torch.where(self.all_in[:, None], torch.isfinite(score), chosen)
