"""Dream's decoding algorithms (``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``), and
Fast-dLLM's ``confidence_threshold``.

Schedule: timesteps = linspace(1, eps, steps_per_block + 1); at block step i with t = ts[i],
s = ts[i + 1], a row with n masked tokens in the current block unmasks int(n * (1 - s / t)) of
them (all on the block's last step); ``origin`` instead unmasks each masked token of the block
independently with probability 1 - s / t. With ``block_length`` null the whole response is one
block (Dream's own generation); otherwise blocks of ``block_length`` are decoded left to right
with ``steps`` split evenly over them (Fast-dLLM's block-wise Dream, which is what its prefix and
dual caches run on).

``first_token``: ``schedule`` (default) applies the schedule from the block's first step on;
``commit`` is Fast-dLLM's rule: the block-start forward commits exactly one token, the block's
first position (its prediction from that forward), and the schedule then runs from ts[1] on the
block's remaining masked tokens (steps 1 .. steps_per_block - 1; with one step per block, that
step commits the whole block).

``alg_temp``: null / 0 commits the ``n`` most confident positions; > 0 draws them, without
replacement, from softmax(confidence / alg_temp) over the eligible positions (Dream's code).
The logit shift of Dream is handled by the denoising loop, not here.

``confidence_threshold`` is the rule of Fast-dLLM's Dream code without a cache
(``dream/model/generation_utils.py`` of NVlabs/Fast-dLLM, its "parallel" runs:
``alg=confidence_threshold threshold=0.9 diffusion_steps=gen/32``), which has no blocks: step i takes
the ``cap`` = gen_length / steps + (the count rejected at step i - 1) most confident masked positions
of the whole response, commits the first whatever its confidence and each other one whose
confidence (the chosen token's probability) is >= ``threshold``; the rest are rejected and raise the
next step's cap. A last step that rejects any adds one step with no new quota (it takes only the
rejected count), and so on, so a row runs ``steps`` forwards and one more per such step. Its
block-wise code (the ``use_cache`` path, prefix and dual caches) is another rule:
``decoding=threshold first_token=commit``. The authors' code runs batch 1; here each row keeps its
own cap and step count, and the batch runs until its longest row is done.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import DecodeContext, Decoder, StepPlan, exclude_token, first_position_plan, register_decoder, top_n_mask

#: the algorithms whose positions alg_temp may draw (origin's are random, confidence_threshold's its own rule)
RANKED_ALGORITHMS = ("maskgit_plus", "topk_margin", "entropy")
ALGORITHMS = ("origin", *RANKED_ALGORITHMS, "confidence_threshold")
DEFAULT_THRESHOLD = 0.9  # Fast-dLLM's
DEFAULT_EPS = 1e-3  # Dream's: its timesteps end at eps
FIRST_TOKEN_RULES = ("schedule", "commit")


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


def sample_positions(score: Tensor, n: Tensor, alg_temp: float, generator: torch.Generator | None) -> Tensor:
    """(B, T) bool: per row, ``n[b]`` positions drawn without replacement from softmax(score / alg_temp).

    Positions with score -inf are never drawn. Where the softmax underflows to zero for some
    eligible positions and too few remain, the rest are taken by score (the zero-temperature limit).
    """
    chosen = torch.zeros_like(score, dtype=torch.bool)
    for row in range(score.shape[0]):
        eligible = torch.isfinite(score[row])
        k = min(int(n[row]), int(eligible.sum()))
        if k == 0:
            continue
        probs = torch.softmax(score[row].double() / alg_temp, dim=-1)
        drawable = min(k, int((probs > 0).sum()))
        picked = torch.multinomial(probs, drawable, replacement=False, generator=generator)
        chosen[row, picked] = True
        if drawable < k:
            rest = score[row].masked_fill(chosen[row], float("-inf"))
            chosen[row, rest.topk(k - drawable).indices] = True
    return chosen


def check_threshold_rule(alg: str, threshold, block_length: int | None, first_token: str,
                         alg_temp: float | None, eps: float) -> None:
    """``threshold`` belongs to ``confidence_threshold``, which has no blocks, no drawn positions and
    no timesteps (``eps``)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"decoding.threshold={threshold!r} must be a number in (0, 1]")
    if alg != "confidence_threshold":
        if threshold != DEFAULT_THRESHOLD:
            raise ValueError(f"decoding.threshold={threshold} is used by alg=confidence_threshold only "
                             f"(alg={alg!r} commits its schedule's count)")
        return
    if block_length is not None:
        raise ValueError(f"decoding.alg=confidence_threshold with block_length={block_length}: it is Fast-dLLM's Dream "
                         "rule without a cache, which has no blocks (block_length: null); its block-wise rule "
                         "(the prefix and dual caches) is decoding=threshold first_token=commit")
    if first_token != "schedule":
        raise ValueError(f"decoding.first_token={first_token!r} applies to blocks; alg=confidence_threshold has "
                         "none (first_token: schedule)")
    if alg_temp:
        raise ValueError(f"decoding.alg_temp={alg_temp}: alg=confidence_threshold takes its positions by "
                         "confidence (alg_temp: null)")
    if eps != DEFAULT_EPS:
        raise ValueError(f"decoding.eps={eps}: alg=confidence_threshold has no timesteps to end at eps (eps: "
                         f"{DEFAULT_EPS})")


@register_decoder
class DreamDecoder(Decoder):
    name = "dream"

    def __init__(self, steps: int, alg: str = "entropy", temperature: float = 0.0, top_p: float | None = None,
                 top_k: int | None = None, eps: float = DEFAULT_EPS, block_length: int | None = None,
                 first_token: str = "schedule", alg_temp: float | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__(steps, block_length, temperature)
        if alg not in ALGORITHMS:
            raise ValueError(f"decoding.alg={alg!r} (allowed: {list(ALGORITHMS)})")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"decoding.top_p={top_p} must be in (0, 1]")
        if top_k is not None and top_k < 1:
            raise ValueError(f"decoding.top_k={top_k} must be >= 1")
        if not 0 < eps < 1:
            raise ValueError(f"decoding.eps={eps} must be in (0, 1)")
        if first_token not in FIRST_TOKEN_RULES:
            raise ValueError(f"decoding.first_token={first_token!r} (allowed: {list(FIRST_TOKEN_RULES)})")
        if alg_temp is not None:
            if isinstance(alg_temp, bool) or not isinstance(alg_temp, (int, float)) or not 0 <= alg_temp < math.inf:
                raise ValueError(f"decoding.alg_temp={alg_temp!r} must be a finite number >= 0 (or null = top-k by "
                                 "confidence)")
            if alg_temp > 0 and alg == "origin":
                raise ValueError(f"decoding.alg_temp={alg_temp} needs a confidence algorithm "
                                 f"(allowed with alg: {list(RANKED_ALGORITHMS)}); alg='origin' draws its positions at random")
        check_threshold_rule(alg, threshold, block_length, first_token, alg_temp, eps)
        self.alg, self.top_p, self.top_k, self.eps = alg, top_p, top_k, eps
        self.threshold = float(threshold)
        self.first_token = first_token
        self.alg_temp = float(alg_temp) if alg_temp else None  # None: top-k by confidence
        # entropy scores are <= 0 and origin's order is random: neither is a probability.
        self.confidence_is_probability = alg in ("maskgit_plus", "topk_margin", "confidence_threshold")

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k is not None and self.top_k > vocab_size:
            raise ValueError(f"decoding.top_k={self.top_k} exceeds the vocabulary ({vocab_size} tokens), where it "
                             f"filters nothing (allowed: 1 ... {vocab_size}, or null)")

    def check(self, gen_length: int) -> None:
        super().check(gen_length)
        if self.alg == "confidence_threshold" and gen_length % self.steps:
            raise ValueError(f"decoding.alg=confidence_threshold: gen_length={gen_length} is not divisible by "
                             f"steps={self.steps} (the per-step quota is gen_length / steps, as Fast-dLLM asserts)")

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.timesteps = torch.linspace(1, self.eps, self.steps_per_block + 1, dtype=torch.float64).tolist()
        if self.alg == "confidence_threshold":
            B = ctx.batch
            self.quota = torch.full((B,), ctx.gen_length // self.steps, dtype=torch.long, device=ctx.device)
            self.last_step = torch.full((B,), self.steps - 1, dtype=torch.long, device=ctx.device)
            self.cap = torch.zeros(B, dtype=torch.long, device=ctx.device)
            self.masked_before = None

    def plan_threshold(self, step: int, masked: Tensor) -> StepPlan | None:
        """confidence_threshold's step: the cap per row (kept for :meth:`select`), at least one commit."""
        P, G = self.ctx.prompt_length, self.ctx.gen_length
        left = masked[:, P:].sum(1)
        rejected = torch.zeros_like(left)
        if self.masked_before is not None:
            # What the previous step did not commit of its cap (EOS filled by stop_at_eos is not a rejection).
            rejected = (self.cap - (self.masked_before - left)).clamp(min=0)
            extend = (self.last_step == step - 1) & (rejected > 0)
            self.quota = self.quota.masked_fill(extend, 0)
            self.last_step = self.last_step + extend.long()
        running = self.last_step >= step
        if not running.any():
            return None
        self.cap = torch.where(running, self.quota + rejected, 0)
        self.masked_before = left
        return StepPlan((P, P + G), torch.minimum(self.cap, left).clamp(max=1), 0, step)

    def commits_first(self, block_step: int) -> bool:
        """True at a block start where Fast-dLLM's rule commits only the block's first position."""
        return self.first_token == "commit" and block_step == 0 and self.steps_per_block > 1

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        if self.alg == "confidence_threshold":
            return self.plan_threshold(step, masked)
        if step == self.steps:
            return None
        ctx = self.ctx
        block, block_step = divmod(step, self.steps_per_block)
        lo = ctx.prompt_length + block * self.block
        hi = lo + self.block
        if self.commits_first(block_step):
            return first_position_plan(masked, (lo, hi), block, block_step)
        last = block_step == self.steps_per_block - 1
        keep_fraction = 0.0 if last else self.timesteps[block_step + 1] / self.timesteps[block_step]
        if self.alg == "origin":
            # Each masked token flips with probability 1 - s/t; which ones is random (priority).
            draw = torch.rand(masked.shape, generator=ctx.generator, device=masked.device, dtype=torch.float64)
            self.origin_scores = -draw
            flips = (draw < 1 - keep_fraction) & masked
            flips[:, :lo] = False
            flips[:, hi:] = False
            n_transfer = flips.sum(1)
        elif last:
            n_transfer = masked[:, lo:hi].sum(1)
        else:
            n_transfer = (masked[:, lo:hi].sum(1).double() * (1 - keep_fraction)).long()
        return StepPlan((lo, hi), n_transfer, block, block_step)

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
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

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        if plan.scheduled is not None:  # Fast-dLLM: the block's first position, whatever its score
            return plan.scheduled & torch.isfinite(score)
        if self.alg == "confidence_threshold":  # the first of the cap whatever its confidence, then the confident
            return top_n_mask(score, plan.n_transfer) | (top_n_mask(score, self.cap) & (score >= self.threshold))
        if self.alg_temp is not None:
            return sample_positions(score, plan.n_transfer, self.alg_temp, self.ctx.generator)
        return top_n_mask(score, plan.n_transfer)
