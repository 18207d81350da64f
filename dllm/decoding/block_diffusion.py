"""The decoder of the block-diffusion models SDAR / TraDo (JetAstra/SDAR ``generate.py``,
``block_diffusion_generate``) and LLaDA2.0 (``modeling_llada2_moe.py``, ``generate``).

The region is decoded one attention block at a time (blocks of ``block_length`` counted from each
sequence's first token, so the prompt's partial last block is the first one decoded; see
:mod:`dllm.decoding.layout`). Inside a block, step s commits ``k_s`` tokens, the schedule
``k = [block_length // steps] * steps`` with the remainder one extra to the first steps (the
authors' ``get_num_transfer_tokens``; counted over the whole block even when a prompt tail fills
part of it, as they do):

- ``remasking: static``: the ``k_s`` most confident masked positions of the block
  (SDAR's ``low_confidence_static``);
- ``remasking: dynamic``: every masked position whose confidence is > ``threshold`` (strictly) if
  there are at least ``k_s`` of them, else the ``k_s`` most confident (SDAR's
  ``low_confidence_dynamic``; LLaDA2.0's only rule).

A block ends once it has no masked position left (within ``steps`` steps: every step commits at
least ``k_s`` or all that remain). Each row commits at most what it has masked (the authors' code,
at batch 1, could pick non-masked positions when ``k_s`` exceeds them; here it cannot).

Sampling: temperature 0 takes the argmax and its softmax probability over the whole vocabulary
(LLaDA2.0's greedy branch; for SDAR, the unfiltered confidence of its OpenCompass harness, since
its ``generate.py`` "greedy" top_k=1 makes every confidence 1). Temperature > 0: logits /
temperature, then top-k, then top-p, then a draw from the softmax; the confidence is the drawn
token's probability under that filtered distribution (both authors' code).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import DecodeContext, Decoder, StepPlan, check_tie_break, exclude_token, register_decoder, top_n_by

REMASKING = ("static", "dynamic")
DEFAULT_THRESHOLD = 0.9  # SDAR/TraDo's dynamic threshold


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"decoding.top_k={top_k!r} must be an integer >= 1 or null (no top-k filter)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"decoding.top_p={top_p!r} must be in (0, 1] or null (no top-p filter)")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"decoding.temperature=0 is greedy: top_k={top_k!r} / top_p={top_p!r} would not apply "
                         "(set them to null, or a temperature > 0)")


def sample_filtered(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                    generator: torch.Generator | None, never: int) -> tuple[Tensor, Tensor]:
    """Tokens and confidences from logits (N, V); token ``never`` ([MASK]) is never chosen.

    Temperature 0: the argmax, with its softmax probability over the whole vocabulary as the
    confidence. Otherwise a draw from the temperature-scaled, top-k then top-p filtered softmax
    (``never`` removed first); the confidence is the drawn token's probability under it.
    """
    if temperature == 0:
        tokens = exclude_token(logits, never).argmax(-1)
        return tokens, torch.softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    logits = exclude_token(logits.float(), never) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ordered, order = logits.sort(-1, descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()  # keep the token that crosses top_p
        beyond[..., 0] = False
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
    probs = logits.softmax(-1)
    tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def block_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens per step inside a block: block_length // steps each, the remainder to the first steps."""
    return [block_length // steps + (s < block_length % steps) for s in range(steps)]


class BlockCausalDecoder(Decoder):
    """Base of the block-diffusion models' decoders: attention blocks of ``block_length`` decoded left
    to right, the current one being the first that any row still has masked positions in."""

    block_causal = True

    def check(self, gen_length: int) -> None:
        if gen_length < 1:  # any length: the region is extended to whole blocks (dllm.decoding.layout)
            raise ValueError(f"gen_length={gen_length} must be >= 1")

    def start(self, ctx: DecodeContext) -> None:
        self.ctx, self.block = ctx, self.block_length
        self.current_block, self.block_start_step = -1, 0

    def current(self, step: int, masked: Tensor) -> tuple[int, int, int] | None:
        """(block index, its first column, step inside it), or None when nothing is left to decode."""
        P, B = self.ctx.prompt_length, masked.shape[0]
        pending = masked[:, P:].reshape(B, -1, self.block).any(2).any(0)
        if not pending.any():
            return None
        block = int(pending.nonzero()[0])
        if block != self.current_block:
            self.current_block, self.block_start_step = block, step
            self.start_block()
        return block, P + block * self.block, step - self.block_start_step

    def start_block(self) -> None:
        """Hook for what a decoder resets at each block."""


@register_decoder
class BlockDiffusion(BlockCausalDecoder):
    name = "block_diffusion"

    def __init__(self, block_length: int = 4, steps: int = 4, remasking: str = "dynamic", threshold: float = DEFAULT_THRESHOLD,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 tie_break: str = "row") -> None:
        super().__init__(steps, block_length, temperature)
        if block_length is None:
            raise ValueError("decoding.block_length must be set: the model's attention block (SDAR/TraDo 4, LLaDA2.0 32)")
        if steps > block_length:
            raise ValueError(f"decoding.steps={steps} (per block) exceeds block_length={block_length}")
        if remasking not in REMASKING:
            raise ValueError(f"decoding.remasking={remasking!r} (allowed: {list(REMASKING)})")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"decoding.threshold={threshold!r} must be in [0, 1]")
        if remasking == "static" and threshold != DEFAULT_THRESHOLD:
            raise ValueError(f"decoding.threshold={threshold} is read by remasking=dynamic only (static commits its "
                             "schedule's count)")
        check_sampling(temperature, top_k, top_p)
        check_tie_break(tie_break)
        self.remasking, self.threshold, self.top_k, self.top_p = remasking, float(threshold), top_k, top_p
        self.tie_break = tie_break
        self.schedule = block_schedule(block_length, steps)

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        if (current := self.current(step, masked)) is None:
            return None
        block, lo, block_step = current
        left = masked[:, lo : lo + self.block].sum(1)
        return StepPlan((lo, lo + self.block), left.clamp(max=self.schedule[block_step]), block, block_step)

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return sample_filtered(logits, self.temperature, self.top_k, self.top_p, self.ctx.generator,
                               self.ctx.mask_token_id)

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        ranked = top_n_by(self.tie_break, score, plan.n_transfer, plan.window)
        if self.remasking == "static":
            return ranked
        confident = torch.isfinite(score) & (score > self.threshold)
        enough = confident.sum(1) >= plan.n_transfer
        return torch.where(enough[:, None], confident, ranked)
