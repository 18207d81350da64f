"""EB-Sampler: entropy-bounded unmasking (Ben-Hamu et al., 2025, arXiv 2505.24857).

Each step, per row, the freshly predicted masked positions of the current block are sorted by an
error proxy, best first (``error_proxy``: ``entropy`` of the predictive distribution, lowest
first, the default; ``confidence``, the probability of the chosen token, highest first;
``margin``, top-1 minus top-2 probability, largest first). The sampler commits the longest prefix
U of that order with

    sum_{l in U} H_l  -  max_{l in U} H_l  <=  gamma

where H_l is the entropy (nats) of position l's predictive distribution, whatever the ordering:
the first token is therefore always committed, and gamma = 0 commits one token per step (several
only when their entropies are exactly 0). The left side is non-decreasing along the order, so
"the longest prefix" and "every position where it holds" are the same set.

Blocks of ``block_length`` left to right (null = the whole response; an integer = LLaDA's
semi-autoregressive blocks, e.g. for ``cache=prefix``/``dual``), one block for the whole batch: a
block ends when no row has a masked token in it (as ``decoding=threshold``); the number of steps
is data-dependent (``steps`` is accepted, for callers that always pass it, and not used). Tokens are LLaDA's (greedy,
or Gumbel noise on float64 logits with ``temperature`` > 0, [MASK] never chosen); entropies,
probabilities and margins come from the noise-free float64 softmax over the whole vocabulary
([MASK] included), as every other confidence in this package. The loop's confidence is the
chosen token's probability (so ``cache=d2cache`` can rank with it); the proxy and the entropies
are kept from ``propose`` with the positions the loop names and laid onto them in ``priority``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ar import check_block_length, check_temperature, check_unused_steps
from .base import Decoder, StepPlan, exclude_token, gumbel_argmax, on_positions, register_decoder
from .threshold import Threshold

ERROR_PROXIES = ("entropy", "confidence", "margin")


@register_decoder
class EBSampler(Threshold):
    name = "eb_sampler"

    def __init__(self, gamma: float = 0.1, block_length: int | None = None, error_proxy: str = "entropy",
                 temperature: float = 0.0, steps: int | None = None) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or math.isnan(gamma) or gamma < 0:
            raise ValueError(f"decoding.gamma={gamma!r} must be a number >= 0 (0 = one token per step; inf = every "
                             "fresh token of the block)")
        if error_proxy not in ERROR_PROXIES:
            raise ValueError(f"decoding.error_proxy={error_proxy!r} (allowed: {list(ERROR_PROXIES)})")
        check_block_length(block_length)
        check_temperature(temperature)
        check_unused_steps(steps, "eb_sampler")
        Decoder.__init__(self, 1, block_length, float(temperature))  # Threshold's blocks, not its rule
        self.gamma, self.error_proxy = float(gamma), error_proxy

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if positions is None:
            raise ValueError("decoding=eb_sampler needs the positions of the logits rows (the loop passes them)")
        self.positions = positions
        tokens = gumbel_argmax(exclude_token(logits, self.ctx.mask_token_id), self.temperature, self.ctx.generator)
        probs = torch.softmax(logits.double(), dim=-1)
        chosen = probs.gather(-1, tokens[..., None]).squeeze(-1)
        self.entropy = torch.special.entr(probs).sum(-1)  # 0 log 0 = 0
        if self.error_proxy == "entropy":
            self.goodness = -self.entropy
        elif self.error_proxy == "confidence":
            self.goodness = chosen
        else:
            top2 = probs.topk(2, dim=-1).values
            self.goodness = top2[..., 0] - top2[..., 1]
        return tokens, chosen

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        """The proxy (higher = committed first) on the fresh positions, NaN elsewhere; keeps the
        entropies on the same positions for :meth:`select`."""
        T = confidence.shape[1]
        self.entropy_map = on_positions(self.entropy, self.positions, T)
        return on_positions(self.goodness, self.positions, T)

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        ordered, order = score.sort(dim=1, descending=True, stable=True)
        eligible = torch.isfinite(ordered)
        entropy = self.entropy_map.gather(1, order).masked_fill(~eligible, float("inf"))
        spent = entropy.cumsum(1) - entropy.cummax(1).values
        take = ((spent <= self.gamma) & eligible).long().cumprod(1).sum(1)
        take = torch.maximum(take, eligible.any(1).long())  # at least one (the first: spent = 0)
        keep = torch.arange(score.shape[1], device=score.device)[None, :] < take[:, None]
        return torch.zeros_like(keep).scatter(1, order, keep)
