"""Fast-dLLM v2's decoder (NVlabs, ``Fast_dLLM_QwenForCausalLM.generate`` / ``batch_sample``).

Attention blocks of ``block_length`` (the model's ``bd_size``, 32) are decoded left to right, each
in sub-blocks of ``sub_block_length`` (8), strictly left to right:

1. The block's first position, when masked, is committed first, alone, greedily (argmax, at any
   temperature) from the previous position, the last of the finished block (the authors'
   "commit" forward that re-encodes that block and appends the next token; the model predicts
   position j from hidden state j - 1). A prompt's partial last block opens with prompt tokens,
   so its first masked position is decoded like the others.
2. Then each step commits, in the first sub-block with a masked position, every masked position
   whose confidence is > ``threshold`` (strictly), and always the most confident one.

Temperature 0: argmax and its softmax probability; temperature > 0: a draw from the top-p filtered
softmax (the authors run sampling at batch 1 only; here every row draws). A row stops at its first
EOS once everything before it is decoded (with ``stop_at_eos``), not at the end of its block.
Deviation: the authors take the argmax and the threshold's confidence of bf16 probabilities (ties to
the lowest id); here the argmax of the logits in the model's dtype, the confidence in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import StepPlan, register_decoder, top_n_mask
from .block_diffusion import BlockCausalDecoder, check_sampling, sample_filtered


@register_decoder
class FastDllmV2(BlockCausalDecoder):
    name = "fast_dllm_v2"
    stop_block = None  # a row stops at its first EOS, not at the end of that EOS's block

    def __init__(self, block_length: int = 32, sub_block_length: int = 8, threshold: float = 0.9,
                 temperature: float = 0.0, top_p: float | None = None) -> None:
        super().__init__(1, block_length, temperature)  # the step count is data-dependent
        if block_length is None:
            raise ValueError("decoding.block_length must be set: the model's bd_size (32)")
        if (isinstance(sub_block_length, bool) or not isinstance(sub_block_length, int) or sub_block_length < 1
                or block_length % sub_block_length):
            raise ValueError(f"decoding.sub_block_length={sub_block_length!r} must be an integer >= 1 dividing "
                             f"block_length={block_length}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"decoding.threshold={threshold!r} must be in [0, 1] (1: one token per step)")
        check_sampling(temperature, None, top_p)
        self.sub_block_length, self.threshold, self.top_p = sub_block_length, float(threshold), top_p

    def check_model(self, logit_shift: int) -> None:
        if logit_shift != 1:
            raise ValueError("decoding=fast_dllm_v2 commits a block's first token from the previous position: it needs "
                             "a model that predicts position j from j - 1 (Fast-dLLM v2); use decoding=block_diffusion")

    def start_block(self) -> None:
        self.first_done = False

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        if (current := self.current(step, masked)) is None:
            return None
        block, lo, block_step = current
        B = masked.shape[0]
        first = masked[:, lo]
        self.committing_first = not self.first_done and bool(first.any())
        self.first_done = True
        if self.committing_first:
            scheduled = torch.zeros_like(masked)
            scheduled[:, lo] = first
            return StepPlan((lo, lo + 1), first.long(), block, block_step, scheduled=scheduled)
        sub = self.sub_block_length
        in_block = masked[:, lo : lo + self.block].reshape(B, -1, sub).any(2).any(0)
        start = lo + int(in_block.nonzero()[0]) * sub
        return StepPlan((start, start + sub), masked[:, start : start + sub].any(1).long(), block, block_step)

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        temperature = 0.0 if self.committing_first else self.temperature
        return sample_filtered(logits, temperature, None, None if self.committing_first else self.top_p,
                               self.ctx.generator, self.ctx.mask_token_id)

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        most_confident = top_n_mask(score, plan.n_transfer)
        if self.committing_first:
            return most_confident
        return most_confident | (torch.isfinite(score) & (score > self.threshold))
