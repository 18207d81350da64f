"""Fast-dLLM confidence-aware parallel decoding: commit every confident token of the block.

Blocks of ``block_length`` left to right (one block for the whole batch: a block ends when no
row has a masked token left in it). Each step commits, per row, every freshly predicted masked
token of the block whose confidence is >= ``threshold`` — always at least the most confident
one. With ``factor`` set, the factor rule is used instead: sorted by confidence, the n-th
token is committed while c_(n) >= 1 - factor / (n + 1) (the first one always).
The number of steps is therefore data-dependent; ``steps`` is not used.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import DecodeContext, StepPlan, register_decoder, top_n_mask
from .llada import BlockDecoder


@register_decoder
class Threshold(BlockDecoder):
    name = "threshold"

    def __init__(self, block_length: int = 32, threshold: float = 0.9, factor: float | None = None,
                 temperature: float = 0.0, steps: int | None = None) -> None:
        super().__init__(1, block_length, temperature)
        if not 0 < threshold <= 1:
            raise ValueError(f"decoding.threshold={threshold} must be in (0, 1]")
        if factor is not None and factor <= 0:
            raise ValueError(f"decoding.factor={factor} must be > 0 (or null for the threshold rule)")
        self.threshold, self.factor = threshold, factor

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
        at_least_one = masked[:, lo : lo + self.block].any(1).long()
        return StepPlan((lo, lo + self.block), at_least_one, block, step - self.block_start_step)

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        if self.factor is None:
            return top_n_mask(score, plan.n_transfer) | (torch.isfinite(score) & (score >= self.threshold))
        ordered = score.sort(1, descending=True).values
        rank = torch.arange(1, score.shape[1] + 1, device=score.device, dtype=score.dtype)
        bound = 1 - self.factor / (rank + 1)
        bound[0] = float("-inf")
        accepted = (torch.isfinite(ordered) & (ordered >= bound)).long().cumprod(1).sum(1)
        return top_n_mask(score, accepted)
