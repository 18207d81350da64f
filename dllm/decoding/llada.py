"""LLaDA's semi-autoregressive remasking: blocks left to right, a fixed token count per step."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import DecodeContext, Decoder, StepPlan, exclude_token, gumbel_argmax, llada_transfer_counts, register_decoder, top_n_mask


class BlockDecoder(Decoder):
    """Blocks of ``block_length`` decoded left to right with ``steps`` split evenly over blocks."""

    #: the dtype of the softmax whose chosen-token probability is the confidence: "float64", or
    #: "logits" (the logits' own, as LLaDA's current generate() computes it)
    confidence_dtype: str = "float64"

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.counts: Tensor | None = None

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        if step == self.steps:
            return None
        block, block_step = divmod(step, self.steps_per_block)
        lo = self.ctx.prompt_length + block * self.block
        hi = lo + self.block
        if block_step == 0:
            self.counts = llada_transfer_counts(masked[:, lo:hi].sum(1), self.steps_per_block)
            self.start_block(lo, hi)
        return StepPlan((lo, hi), self.counts[:, block_step], block, block_step)

    def start_block(self, lo: int, hi: int) -> None:
        """Hook for policies that fix something per block (the random order)."""

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens = gumbel_argmax(exclude_token(logits, self.ctx.mask_token_id), self.temperature, self.ctx.generator)
        # LLaDA's confidence: the noise-free softmax over the whole vocabulary.
        probs = torch.softmax(logits.double() if self.confidence_dtype == "float64" else logits, dim=-1)
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


CONFIDENCE_DTYPES = ("float64", "logits")


@register_decoder
class LowConfidence(BlockDecoder):
    """Unmask the most confident predictions (softmax probability of the chosen token).

    ``confidence_dtype``: ``float64`` (default) computes that softmax in float64, as LLaDA's
    generate() did until its commit f51cb17 (June 2025) and as the Fast-dLLM and dKV-Cache code
    does; ``logits``: in the logits' own dtype (float32 on CPU here, bfloat16 on a GPU), as LLaDA's
    generate() has since. Near 1 a lower precision rounds distinct confidences to equal ones (with
    ``cfg_scale``'s amplified logits, several are exactly 1.0), and ``torch.topk`` over the row then
    decides the tie, as in those codes (its order among equal values is unspecified, not the earlier
    position first).
    """

    name = "low_confidence"

    def __init__(self, steps: int, block_length: int | None = None, temperature: float = 0.0,
                 confidence_dtype: str = "float64") -> None:
        super().__init__(steps, block_length, temperature)
        if confidence_dtype not in CONFIDENCE_DTYPES:
            raise ValueError(f"decoding.confidence_dtype={confidence_dtype!r} (allowed: {list(CONFIDENCE_DTYPES)})")
        self.confidence_dtype = confidence_dtype


@register_decoder
class RandomRemasking(BlockDecoder):
    """Unmask uniformly random positions.

    The order inside a block is drawn once at the block start (equal in distribution to a
    fresh draw per step), so the positions of every step are known before its forward —
    dKV-Cache-Greedy relies on that.
    """

    name = "random"
    order_known_in_advance = True

    def start_block(self, lo: int, hi: int) -> None:
        ctx = self.ctx
        self.order_scores = torch.full((ctx.batch, ctx.length), float("-inf"), device=ctx.device, dtype=torch.float64)
        draw = torch.rand(ctx.batch, hi - lo, generator=ctx.generator, dtype=torch.float64, device=ctx.device)
        self.order_scores[:, lo:hi] = draw

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        plan = super().plan(step, masked)
        if plan is None:
            return None
        score = self.order_scores.masked_fill(~masked, float("-inf"))
        plan.scheduled = top_n_mask(score, plan.n_transfer)
        return plan

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        return self.order_scores

