"""Autoregressive (left-to-right) decoding: one token per step, in position order.

Step i commits response position P + i, with the prediction of that step's forward; so
``steps`` = gen_length (``steps: null`` means gen_length; any other value is refused). The
order is fixed before the forward (``order_known_in_advance``, ``StepPlan.scheduled``): the loop
makes position P + i fresh whatever the cache method asks, and dKV-Cache-Greedy can run on it.

``block_length`` (null = the whole response) only groups the steps into blocks for the cache
methods: the window of step i is its block [lo, hi) (the positions before P + i in it are already
decoded), so that Fast-dLLM's prefix/dual caches recompute the block's decoded tokens with their
real ids, dKV-Cache and friends refresh per block, exactly as under a block decoder. What is
committed does not depend on it: always and only P + i. With ``block_length: 1`` the window is
[P + i, P + i + 1), every step a block start. Tokens and confidences are LLaDA's (greedy, or
Gumbel noise with ``temperature`` > 0; confidence = softmax probability of the chosen token).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import DecodeContext, StepPlan, register_decoder
from .llada import BlockDecoder


def check_block_length(block_length) -> None:
    if block_length is not None and (isinstance(block_length, bool) or not isinstance(block_length, int)
                                     or block_length < 1):
        raise ValueError(f"decoding.block_length={block_length!r} must be an integer >= 1 (or null = gen_length)")


def check_unused_steps(steps, decoder: str) -> None:
    """``steps`` of a decoder whose step count is data-dependent: accepted (callers always pass one), not used."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"decoding.steps={steps!r} must be an integer >= 1 or null ({decoder}'s step count is "
                         "data-dependent: the value is not used)")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"decoding.temperature={temperature!r} must be a number >= 0 (0 = greedy)")


@register_decoder
class Autoregressive(BlockDecoder):
    name = "ar"
    order_known_in_advance = True

    def __init__(self, steps: int | None = None, block_length: int | None = None, temperature: float = 0.0) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"decoding.steps={steps!r} must equal gen_length (one token per step) "
                             "or be null (= gen_length)")
        check_block_length(block_length)
        check_temperature(temperature)
        super().__init__(steps or 1, block_length, float(temperature))
        self.steps_asked = steps

    def check(self, gen_length: int) -> None:
        self.check_blocks(gen_length)
        if self.steps_asked is not None and self.steps_asked != gen_length:
            raise ValueError(
                f"decoding.steps={self.steps_asked} must equal gen_length={gen_length} for decoding=ar "
                "(one token per step), or be null (= gen_length)"
            )

    def start(self, ctx: DecodeContext) -> None:
        self.steps = ctx.gen_length
        super().start(ctx)

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        if step == self.steps:
            return None
        P = self.ctx.prompt_length
        block, block_step = divmod(step, self.block)
        lo = P + block * self.block
        scheduled = torch.zeros_like(masked)
        scheduled[:, P + step] = masked[:, P + step]  # not masked only where stop_at_eos filled the row
        return StepPlan((lo, lo + self.block), scheduled[:, P + step].long(), block, block_step, scheduled)

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        return plan.scheduled & torch.isfinite(score)
