"""Decoding policies: *when* (schedule) and *which* (priority) masked positions get unmasked.

A decoder never runs the model. Each step the denoising loop asks it for a :class:`StepPlan`
(eligible window, how many tokens per row), hands it the logits of the freshly computed masked
positions to :meth:`Decoder.propose` tokens and confidences, and ranks eligible positions with
:meth:`Decoder.priority`. The loop then commits what :meth:`Decoder.select` picks (by default the top ``n_transfer`` per row).

A decoder that sets ``remasks`` may also take tokens back: when its plan names a ``verify`` window,
the loop re-scores that window's committed tokens with each token hidden
(:mod:`dllm.decoding.verify`), and :meth:`Decoder.remask` returns committed response positions to
mask again. The loop masks them, counts them, and recomputes their K/V in the next forward,
whatever the cache method asks (a re-masked position's stored K/V still describe the old token).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from dllm.registry import Registry


@dataclass
class StepPlan:
    window: tuple[int, int]  # absolute positions [lo, hi) that may be unmasked this step
    n_transfer: Tensor  # (B,) long: how many tokens each row unmasks this step
    block: int  # index of the current block
    block_step: int  # step inside the current block (0 = block start)
    #: (B, T) bool, the positions this step will unmask, when fixed before the forward; the loop
    #: makes their predictions fresh whatever the cache method asks (random remasking, first tokens)
    scheduled: Tensor | None = None
    #: [lo, hi) the n_transfer tokens come from, for a decoder that looks beyond what it commits
    #: (logits over the rest of the response, commits in the current block); None = ``window``
    commit: tuple[int, int] | None = None
    #: [lo, hi) whose committed tokens the loop re-scores with the token hidden this step (for
    #: :meth:`Decoder.remask`); None = no verification
    verify: tuple[int, int] | None = None

    @property
    def commit_window(self) -> tuple[int, int]:
        return self.commit or self.window


@dataclass
class DecodeContext:
    """Fixed facts of one generation, given to the decoder and the cache method at start."""

    batch: int
    prompt_length: int  # P, the left-padded prompt width; the response is x[:, P:]
    gen_length: int  # G
    mask_token_id: int
    real: Tensor  # (B, P+G) bool, False on left padding
    generator: torch.Generator | None
    device: torch.device
    #: the model's logit shift: 1 for Dream (position j predicted from j - 1), 0 for LLaDA.
    logit_shift: int = 0
    #: a block-diffusion model's attention block (None: bidirectional; see dllm.decoding.layout): the
    #: decoded region [prompt_length, length) starts on a block boundary, blocks are the same columns
    #: in every row, and a row's partial last prompt block opens the region
    attention_block: int | None = None

    @property
    def length(self) -> int:
        return self.prompt_length + self.gen_length


class Decoder(ABC):
    """Base class; subclasses register themselves with :func:`register_decoder`."""

    name: str = ""
    #: True when :meth:`plan` can say which positions will be unmasked before the forward.
    order_known_in_advance: bool = False
    #: True when :meth:`propose`'s confidence is a probability-like score in [0, 1].
    confidence_is_probability: bool = True
    #: True when :meth:`remask` may take committed tokens back (the plan's ``verify`` window).
    remasks: bool = False
    #: True for the decoders of block-diffusion models (block-causal attention over ``block_length``);
    #: the loop pairs them with those models only.
    block_causal: bool = False

    def __init__(self, steps: int, block_length: int | None = None, temperature: float = 0.0) -> None:
        if steps < 1:
            raise ValueError(f"decoding.steps={steps} must be >= 1")
        if block_length is not None and block_length < 1:
            raise ValueError(f"decoding.block_length={block_length} must be >= 1 (or null = gen_length)")
        if not 0 <= temperature < float("inf"):  # inf would turn every Gumbel-noised logit into nan
            raise ValueError(f"decoding.temperature={temperature} must be a finite number >= 0")
        self.steps = steps
        self.block_length = block_length
        self.temperature = temperature

    @property
    def stop_block(self) -> int | None:
        """With ``stop_at_eos``, a row stops once decoded to the end of the block holding its first
        EOS (None: up to that EOS)."""
        return self.block_length

    def check(self, gen_length: int) -> None:
        """Raise ValueError if this schedule cannot decode ``gen_length`` tokens."""
        block = self.check_blocks(gen_length)
        n_blocks = gen_length // block
        if self.steps % n_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({n_blocks})")
        if self.steps // n_blocks > block:
            where = f"block_length={block}" if self.block_length else f"gen_length={block} (one block: block_length null)"
            raise ValueError(f"steps per block ({self.steps // n_blocks}) exceed {where}")

    def check_blocks(self, gen_length: int) -> int:
        """The block length, after checking that blocks tile ``gen_length``."""
        if gen_length < 1:
            raise ValueError(f"gen_length={gen_length} must be >= 1")
        block = self.block_length or gen_length
        if gen_length % block:
            raise ValueError(f"gen_length={gen_length} is not divisible by block_length={block}")
        return block

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a setting names token ids outside a vocabulary of ``vocab_size``;
        called from the checkpoint's config.json before the weights load."""

    def check_model(self, logit_shift: int) -> None:
        """Raise ValueError if this decoder cannot run on a model with this logit shift (1: Dream);
        called from the checkpoint's config.json before the weights load, and by the loop."""

    def start(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.block = self.block_length or ctx.gen_length
        self.steps_per_block = self.steps // (ctx.gen_length // self.block)

    @abstractmethod
    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        """The schedule of step ``step`` (``masked`` is (B, T) bool), or None when decoding is done."""

    @abstractmethod
    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokens (…,) and confidences (…,) from logits (…, V) of masked positions.

        ``positions`` (…,): the absolute position each logits row predicts (the loop passes them,
        T for padding entries), for decoders that keep per-position values besides the confidence.

        As in LLaDA's and Dream's own generation code, confidences come from the softmax over the
        whole vocabulary, [MASK] included; only the token choice excludes [MASK] (committing it
        would leave the position masked and break every schedule).
        """

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        """Ranking score (B, T) of positions given their fresh confidence (NaN where stale)."""
        return confidence

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        """Positions to unmask (B, T) bool from eligible scores (-inf = not eligible)."""
        return top_n_mask(score, plan.n_transfer)

    def remask(self, verified: Tensor, transferred: Tensor, plan: StepPlan) -> Tensor | None:
        """Committed response positions (B, T) bool to mask again, or None.

        verified: (B, T) float64, the probability of each committed token of ``plan.verify`` from a
        query that cannot see it (computed before this step's commits; NaN elsewhere);
        transferred: what this step committed. Called only when ``remasks`` is set; the loop refuses
        positions that are not committed response tokens, or that this step committed.
        """
        return None


REGISTRY: Registry[Decoder] = Registry("decoding", "dllm.decoding")
register_decoder = REGISTRY.register
decoder_names = REGISTRY.names
build_decoder = REGISTRY.build


def first_position_plan(masked: Tensor, window: tuple[int, int], block: int, block_step: int) -> StepPlan:
    """A block-start step that commits the block's first position alone, whatever its confidence
    (Fast-dLLM's Dream rule, ``first_token: commit``). Fixed before the forward, so every cache
    method predicts it; :meth:`Decoder.select` then takes ``plan.scheduled`` where it has a score."""
    lo = window[0]
    first = torch.zeros_like(masked)
    first[:, lo] = masked[:, lo]
    return StepPlan(window, masked[:, lo].long(), block, block_step, scheduled=first)


def llada_transfer_counts(n_masked: Tensor, steps: int) -> Tensor:
    """LLaDA's per-step token counts: n // steps each, the remainder one extra to the first steps.

    n_masked: (B,) masked tokens in the block. Returns (B, steps) long.
    """
    base = n_masked // steps
    remainder = n_masked % steps
    extra = torch.arange(steps, device=n_masked.device)[None, :] < remainder[:, None]
    return base[:, None] + extra.long()


def exclude_token(logits: Tensor, token: int) -> Tensor:
    """A copy of ``logits`` in which ``token`` can never be chosen (its logit -inf)."""
    logits = logits.clone()
    logits[..., token] = float("-inf")
    return logits


def gumbel_argmax(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """argmax of Gumbel-perturbed float64 logits (LLaDA's sampler); plain argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    # argmax(exp(l) / (-log u)^t) computed in log space: same argmax, no overflow of exp(l).
    logits = logits.double()
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits - temperature * torch.log(-torch.log(noise))).argmax(-1)


def on_positions(values: Tensor, positions: Tensor, length: int, fill: float | bool = float("nan")) -> Tensor:
    """(B, length): ``values`` (B, N) laid onto their ``positions`` (B, N; ``length`` marks padding,
    as the loop passes them to :meth:`Decoder.propose`), ``fill`` elsewhere."""
    out = torch.full((values.shape[0], length + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, positions, values)[:, :length]


# decoding.tie_break: how the k best are taken: one topk over the row (default), or as the authors' code of
# SDAR, LLaDA2.0 and PC-Sampler takes them, torch.topk over each row's block of float32 scores. They differ
# only among exactly equal scores, whose order torch.topk leaves unspecified (top-1 sampling makes every
# confidence 1; a float32 softmax rounds near-certain ones alike; PC-Sampler's score clips at alpha).
TIE_BREAKS = ("row", "block")


def check_tie_break(tie_break) -> None:
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"decoding.tie_break={tie_break!r} (allowed: {list(TIE_BREAKS)})")


def top_n_by(tie_break: str, score: Tensor, n: Tensor, window: tuple[int, int]) -> Tensor:
    """:func:`top_n_mask` (``row``) or :func:`block_top_n_mask` over ``window`` (``block``)."""
    return top_n_mask(score, n) if tie_break == "row" else block_top_n_mask(score, n, window)


def block_top_n_mask(score: Tensor, n: Tensor, window: tuple[int, int]) -> Tensor:
    """:func:`top_n_mask` of the scores inside ``window``, taken as the authors' loops take them
    (SDAR's, LLaDA2.0's, PC-Sampler's): ``torch.topk`` on each row's float32 block vector, a row at a
    time (a block is a few dozen positions). Among equal scores torch.topk's order depends on the
    vector it is given, so this is the reference's choice where :func:`top_n_mask`'s may differ."""
    lo, hi = window
    chosen = torch.zeros_like(score, dtype=torch.bool)
    for row, count in enumerate(n.tolist()):
        chosen[row, lo + torch.topk(score[row, lo:hi].float(), count).indices] = True
    return chosen & torch.isfinite(score)


def top_n_mask(score: Tensor, n: Tensor, stable: bool = False) -> Tensor:
    """(B, T) bool selecting the ``n[b]`` highest finite scores of each row. Among equal scores
    ``torch.topk`` chooses in an order that depends on the row's width; ``stable``: the earlier position."""
    k = int(n.max()) if n.numel() else 0
    chosen = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return chosen
    if stable:
        values, index = score.sort(dim=1, descending=True, stable=True)
        values, index = values[:, :k], index[:, :k]
    else:
        values, index = score.topk(k, dim=1)
    keep = (torch.arange(k, device=score.device)[None, :] < n[:, None]) & torch.isfinite(values)
    return chosen.scatter(1, index, keep)
