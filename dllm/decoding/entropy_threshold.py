"""Entropy-threshold parallel decoding: dParallel's and d3LLM's rule (Chen et al., 2025, arXiv
2509.26488, code czg1225/dParallel, ``get_transfer_index_entropy`` in ``LLaDA/generate.py``).

Blocks of ``block_length`` left to right (one block for the whole batch: it ends when no row has a
masked token in it, as ``decoding=threshold``). Each step commits, per row, every freshly predicted
masked token of the block whose predictive entropy is <= ``threshold`` (nats), and always the one
with the lowest entropy. Entropy is the authors' -sum p log(p + 1e-12) of the noise-free float64
softmax over the whole vocabulary ([MASK] included); tokens are LLaDA's (greedy, or Gumbel noise on
float64 logits with ``temperature`` > 0, [MASK] never chosen). The loop's confidence stays the chosen
token's probability (cache methods that rank by it, e.g. d2cache, see the usual value). The number of
steps is data-dependent; ``steps`` is accepted and not used.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ar import check_block_length, check_temperature, check_unused_steps
from .base import Decoder, StepPlan, exclude_token, gumbel_argmax, on_positions, register_decoder, top_n_mask
from .threshold import Threshold

LOG_EPS = 1e-12  # the authors' eps inside the logarithm


@register_decoder
class EntropyThreshold(Threshold):
    name = "entropy_threshold"

    def __init__(self, block_length: int | None = 32, threshold: float = 0.5, temperature: float = 0.0,
                 steps: int | None = None) -> None:
        check_block_length(block_length)
        check_temperature(temperature)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
                or threshold < 0:
            raise ValueError(f"decoding.threshold={threshold!r} must be a number >= 0 (an entropy in nats; 0 = one "
                             "token per step unless several are certain)")
        check_unused_steps(steps, "entropy_threshold")
        Decoder.__init__(self, 1, block_length, float(temperature))  # Threshold's blocks, not its rule
        self.threshold, self.factor = float(threshold), None

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if positions is None:
            raise ValueError("decoding=entropy_threshold needs the positions of the logits rows (the loop passes them)")
        self.positions = positions
        tokens = gumbel_argmax(exclude_token(logits, self.ctx.mask_token_id), self.temperature, self.ctx.generator)
        probs = torch.softmax(logits.double(), dim=-1)
        self.entropy = -(probs * torch.log(probs + LOG_EPS)).sum(-1)
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        """Minus the entropy on the fresh positions (lowest entropy first), NaN elsewhere."""
        return on_positions(-self.entropy, self.positions, confidence.shape[1])

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        certain = torch.isfinite(score) & (-score <= self.threshold)
        return certain | top_n_mask(score, plan.n_transfer)
