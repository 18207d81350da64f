"""WINO: wide-in, narrow-out revocable decoding (Hong et al., 2025, arXiv 2507.18578).

Each step drafts aggressively and takes back what no longer holds. The rule, as read in the
authors' code (Feng-Hong/WINO-DLLM, ``LLaDA/decoding.py::decoding_wino``), per row:

- **Wide in.** Every freshly predicted masked token of the current block whose confidence (softmax
  probability of the chosen token) is > ``threshold`` is committed, at most ``max_accept`` of them
  (the most confident), ``max_accept = min(max(floor(0.7 * masked in the block), 5), 20)``; when
  none passes, the single most confident one.
- **Narrow out.** The block's tokens committed in earlier steps are re-scored with each token
  hidden (the verification of :mod:`dllm.decoding.verify`: the authors' shadow block). Only when
  this step committed more than one token, those whose verification confidence is <
  ``threshold_back`` are masked again; if there are at least ``last_accept`` of them (the number
  the row committed in its previous step; 30 at a block start), only the ``last_accept - 1`` least
  confident are. Tokens committed in this step are never taken back in it.
- Blocks of ``block_length`` left to right, one block for the whole batch: a block ends when no row
  has a masked token in it. The number of steps is data-dependent: each step's net progress is
  at least ``accepted - last_accept + 1``, so a block ends within about ``block_length + 30`` steps.

The authors run batch 1, where their flattened top-k over the batch is the row's; here every rule
is per row. Tokens are LLaDA's (greedy, or Gumbel noise on float64 logits with ``temperature`` >
0), except that [MASK] is never chosen (as every decoder of this package); confidences come from
the noise-free float64 softmax over the whole vocabulary. The authors' code and this one are for
models that predict a position from itself (LLaDA family): the verification query sits at the
token's own position, which has no counterpart in Dream's shifted prediction.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ar import check_block_length, check_temperature, check_unused_steps
from .base import DecodeContext, Decoder, StepPlan, register_decoder, top_n_mask
from .threshold import Threshold

ACCEPT_FRACTION = 0.7  # max_accept: this fraction of the block's masked tokens,
ACCEPT_FLOOR, ACCEPT_CAP = 5, 20  # clamped to [ACCEPT_FLOOR, ACCEPT_CAP] (the authors' constants)
FIRST_LAST_ACCEPT = 30  # "last_accept" at a block start, before any step of it


def _probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"decoding.{name}={value!r} must be a number in [0, 1]")
    return float(value)


@register_decoder
class Wino(Threshold):
    name = "wino"
    remasks = True

    def __init__(self, block_length: int | None = 128, threshold: float = 0.6, threshold_back: float = 0.9,
                 temperature: float = 0.0, steps: int | None = None) -> None:
        check_block_length(block_length)
        check_temperature(temperature)
        check_unused_steps(steps, "wino")
        Decoder.__init__(self, 1, block_length, float(temperature))  # Threshold's blocks, not its rule
        self.threshold = _probability("threshold", threshold)
        self.threshold_back = _probability("threshold_back", threshold_back)
        self.factor = None

    def check_model(self, logit_shift: int) -> None:
        if logit_shift:
            raise ValueError("decoding=wino verifies a token with a query at the token's own position, which needs "
                             "a model that predicts each position from itself (LLaDA family); this model predicts "
                             "position j from j - 1 (Dream family)")

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.last_accept = torch.full((ctx.batch,), FIRST_LAST_ACCEPT, dtype=torch.long, device=ctx.device)

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        previous_block = self.current_block
        plan = super().plan(step, masked)
        if plan is None:
            return None
        if plan.block != previous_block:
            self.last_accept.fill_(FIRST_LAST_ACCEPT)
        lo, hi = plan.window
        masked_in_block = masked[:, lo:hi].sum(1)
        self.max_accept = torch.floor(masked_in_block.double() * ACCEPT_FRACTION).long().clamp(ACCEPT_FLOOR, ACCEPT_CAP)
        plan.verify = plan.window
        return plan

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        above = torch.isfinite(score) & (score > self.threshold)
        chosen = torch.where((above.sum(1) > self.max_accept)[:, None], top_n_mask(score, self.max_accept), above)
        return chosen | (top_n_mask(score, plan.n_transfer) & ~chosen.any(1, keepdim=True))

    def remask(self, verified: Tensor, transferred: Tensor, plan: StepPlan) -> Tensor:
        accepted = transferred.sum(1)
        doubtful = verified < self.threshold_back  # NaN (masked at the forward, outside the block): False
        count = doubtful.sum(1)
        limit = torch.where(count >= self.last_accept, self.last_accept - 1, count)
        least_confident = top_n_mask((-verified).masked_fill(~doubtful, float("-inf")), limit)
        self.last_accept = accepted
        return least_confident & (accepted > 1)[:, None]
