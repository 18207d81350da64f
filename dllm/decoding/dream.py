"""Dream's decoding algorithms (``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``).

Schedule: timesteps = linspace(1, eps, steps + 1); at step i with t = ts[i], s = ts[i + 1], a
row with n masked tokens unmasks int(n * (1 - s / t)) of them (all on the last step);
``origin`` instead unmasks each masked token independently with probability 1 - s / t.
The logit shift of Dream is handled by the denoising loop, not here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import DecodeContext, Decoder, StepPlan, exclude_token, register_decoder

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    sorted_logits, order = logits.sort(-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@register_decoder
class DreamDecoder(Decoder):
    name = "dream"

    def __init__(self, steps: int, alg: str = "entropy", temperature: float = 0.0, top_p: float | None = None,
                 top_k: int | None = None, eps: float = 1e-3, block_length: int | None = None) -> None:
        if block_length is not None:
            raise ValueError("decoding=dream has no blocks: leave block_length null")
        super().__init__(steps, None, temperature)
        if alg not in ALGORITHMS:
            raise ValueError(f"decoding.alg={alg!r} (allowed: {list(ALGORITHMS)})")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"decoding.top_p={top_p} must be in (0, 1]")
        if top_k is not None and top_k < 1:
            raise ValueError(f"decoding.top_k={top_k} must be >= 1")
        if not 0 < eps < 1:
            raise ValueError(f"decoding.eps={eps} must be in (0, 1)")
        self.alg, self.top_p, self.top_k, self.eps = alg, top_p, top_k, eps
        # entropy scores are <= 0 and origin's order is random: neither is a probability.
        self.confidence_is_probability = alg in ("maskgit_plus", "topk_margin")

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.timesteps = torch.linspace(1, self.eps, self.steps + 1, dtype=torch.float64).tolist()

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        if step == self.steps:
            return None
        ctx = self.ctx
        window = (ctx.prompt_length, ctx.length)
        n_masked = masked[:, ctx.prompt_length :].sum(1)
        last = step == self.steps - 1
        keep_fraction = 0.0 if last else self.timesteps[step + 1] / self.timesteps[step]
        if self.alg == "origin":
            # Each masked token flips with probability 1 - s/t; which ones is random (priority).
            draw = torch.rand(masked.shape, generator=ctx.generator, device=masked.device, dtype=torch.float64)
            self.origin_scores = -draw
            flips = (draw < 1 - keep_fraction) & masked
            flips[:, : ctx.prompt_length] = False
            n_transfer = flips.sum(1)
        else:
            n_transfer = (n_masked.double() * (1 - keep_fraction)).long() if not last else n_masked
        return StepPlan(window, n_transfer, 0, step)

    def propose(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        # Dream's sample_tokens: temperature, top-p, top-k and the softmax over the whole
        # vocabulary ([MASK] included); only the choice of the token excludes [MASK].
        logits = logits.float()
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_p is not None and self.top_p < 1:
            logits = filter_top_p(logits, self.top_p)
        if self.top_k is not None:
            logits = filter_top_k(logits, self.top_k)
        probs = logits.softmax(-1)
        choosable = exclude_token(logits, self.ctx.mask_token_id)
        if self.temperature > 0:
            flat = choosable.softmax(-1).reshape(-1, probs.shape[-1])
            tokens = torch.multinomial(flat, 1, generator=self.ctx.generator).view(probs.shape[:-1])
        else:
            tokens = choosable.argmax(-1)
        chosen = probs.gather(-1, tokens[..., None]).squeeze(-1)
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            return tokens, top2[..., 0] - top2[..., 1]
        if self.alg == "entropy":
            return tokens, (probs * torch.log(probs + 1e-10)).sum(-1)
        return tokens, chosen

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        if self.alg == "origin":
            return self.origin_scores.masked_fill(confidence.isnan(), float("nan"))
        return confidence
