"""Fast-dLLM confidence-aware parallel decoding: commit every confident token of the block.

Blocks of ``block_length`` left to right (one block for the whole batch: a block ends when no
row has a masked token left in it). Each step commits, per row, every freshly predicted masked
token of the block whose confidence is >= ``threshold`` — always at least the most confident
one. With ``factor`` set, the factor rule is used instead: sorted by confidence, the n-th
token is committed while c_(n) >= 1 - factor / (n + 1) (the first one always).
The number of steps is therefore data-dependent; ``steps`` is not used.

``alpha`` > 0: Streaming-dLLM's context-aware threshold (arXiv 2601.17917, Eq. 8; the authors'
``context_aware_threshold`` in ``LLaDA-1.5/generate.py``): per row and step the threshold is
``threshold * (1 - alpha * (1 - r))``, r = the masked fraction of the positions the step computes
from the block on: the block, the first ``ratio_window`` positions after it and, when that window
cuts the response, its last position (what ``cache=streaming`` with the same ``window`` keeps;
``ratio_window: null`` = the whole rest of the response). A block starts with r = 1 (threshold
itself); as it fills, the threshold drops. The authors pool r over the batch (they run batch 1);
here it is per row. ``ratio_masked: block`` counts only the block's masked positions in r (over the
same positions' count), as the authors' Dream code does with ``dual_cache=True``.

``first_token: commit``: the block's first step commits only its first position, whatever its
confidence (the prediction of the block-start forward), and the threshold rule runs from the next
step on: the Dream code of Fast-dLLM and Streaming-dLLM (``decoding=dream``'s rule of that name).
Default ``schedule``: the threshold rule from the block's first step on (their LLaDA code).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ar import check_unused_steps
from .base import DecodeContext, StepPlan, first_position_plan, register_decoder, top_n_mask
from .dream import FIRST_TOKEN_RULES
from .llada import BlockDecoder


#: which masked positions r counts: those of every position the step computes from the block on (the
#: paper; the authors' LLaDA code and Dream prefix-cache code), or only the block's over that same
#: count (the authors' Dream code with dual_cache=True, which reuses the block's mask there)
RATIO_MASKED = ("query", "block")
DEFAULT_THRESHOLD = 0.9  # Fast-dLLM's


@register_decoder
class Threshold(BlockDecoder):
    name = "threshold"
    #: Streaming-dLLM's threshold decay (0: off; subclasses that reuse the blocks keep it off)
    alpha: float = 0.0
    ratio_window: int | None = None
    ratio_masked: str = "query"
    first_token: str = "schedule"

    def __init__(self, block_length: int | None = 32, threshold: float = DEFAULT_THRESHOLD, factor: float | None = None,
                 temperature: float = 0.0, steps: int | None = None, alpha: float = 0.0,
                 ratio_window: int | None = None, ratio_masked: str = "query", first_token: str = "schedule") -> None:
        check_unused_steps(steps, self.name)
        if ratio_masked not in RATIO_MASKED:
            raise ValueError(f"decoding.ratio_masked={ratio_masked!r} (allowed: {list(RATIO_MASKED)})")
        if first_token not in FIRST_TOKEN_RULES:
            raise ValueError(f"decoding.first_token={first_token!r} (allowed: {list(FIRST_TOKEN_RULES)})")
        super().__init__(1, block_length, temperature)
        if not 0 < threshold <= 1:
            raise ValueError(f"decoding.threshold={threshold} must be in (0, 1]")
        if factor is not None and not 0 < factor < math.inf:
            raise ValueError(f"decoding.factor={factor} must be a finite number > 0 (or null for the threshold rule)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"decoding.alpha={alpha!r} must be a number in [0, 1] (0 = a fixed threshold)")
        if ratio_window is not None and (isinstance(ratio_window, bool) or not isinstance(ratio_window, int)
                                         or ratio_window < 0):
            raise ValueError(f"decoding.ratio_window={ratio_window!r} must be an integer >= 0 or null (the rest of "
                             "the response)")
        if alpha and factor is not None:
            raise ValueError(f"decoding.alpha={alpha} applies to the threshold rule; factor={factor} selects the "
                             "factor rule (set one of them)")
        if factor is not None and threshold != DEFAULT_THRESHOLD:
            raise ValueError(f"decoding.threshold={threshold} applies to the threshold rule; factor={factor} selects "
                             "the factor rule, which does not read it (set one of them)")
        if not alpha and (ratio_window is not None or ratio_masked != "query"):
            raise ValueError(f"decoding.ratio_window={ratio_window!r} / ratio_masked={ratio_masked!r} shape the "
                             "context-aware threshold, which is off (alpha: 0): set alpha > 0, or leave them null / query")
        self.threshold, self.factor = threshold, factor
        self.alpha, self.ratio_window = float(alpha), ratio_window
        self.ratio_masked, self.first_token = ratio_masked, first_token

    def check(self, gen_length: int) -> None:
        self.check_blocks(gen_length)  # the step count is data-dependent: nothing else to check

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.current_block, self.block_start_step = -1, 0

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        P, G = self.ctx.prompt_length, self.ctx.gen_length
        pending = masked[:, P:].reshape(masked.shape[0], G // self.block, self.block).any(2).any(0)
        if not pending.any():
            return None
        block = int(pending.nonzero()[0])
        if block != self.current_block:
            self.current_block, self.block_start_step = block, step
        lo = P + block * self.block
        if self.first_token == "commit" and step == self.block_start_step:
            return first_position_plan(masked, (lo, lo + self.block), block, 0)
        at_least_one = masked[:, lo : lo + self.block].any(1).long()
        if self.alpha:
            self.row_threshold = self.threshold * (1 - self.alpha * (1 - self.masked_ratio(masked, lo, lo + self.block)))
        return StepPlan((lo, lo + self.block), at_least_one, block, step - self.block_start_step)

    def masked_ratio(self, masked: Tensor, lo: int, hi: int) -> Tensor:
        """(B, 1) masked fraction of the block, the ``ratio_window`` positions after it and, when
        those stop short of the end, the last position (``ratio_masked=block``: the block's masked
        positions over that same count)."""
        T = masked.shape[1]
        if self.ratio_window is None or hi + self.ratio_window >= T:
            region = masked[:, lo:]
        else:
            region = torch.cat([masked[:, lo : hi + self.ratio_window], masked[:, -1:]], 1)
        if self.ratio_masked == "block":
            return masked[:, lo:hi].double().sum(1, keepdim=True) / region.shape[1]
        return region.double().mean(1, keepdim=True)

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        if plan.scheduled is not None:  # first_token=commit: the block's first position, whatever its score
            return plan.scheduled & torch.isfinite(score)
        return self.select_confident(score, plan)

    def select_confident(self, score: Tensor, plan: StepPlan) -> Tensor:
        if self.factor is None:
            threshold = self.row_threshold if self.alpha else self.threshold
            return top_n_mask(score, plan.n_transfer) | (torch.isfinite(score) & (score >= threshold))
        ordered = score.sort(1, descending=True).values
        rank = torch.arange(1, score.shape[1] + 1, device=score.device, dtype=score.dtype)
        bound = 1 - self.factor / (rank + 1)
        bound[0] = float("-inf")
        accepted = (torch.isfinite(ordered) & (ordered >= bound)).long().cumprod(1).sum(1)
        return top_n_mask(score, accepted)
