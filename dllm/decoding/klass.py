"""KLASS: KL-Adaptive Stability Sampling (Kim, Hong et al., 2025, arXiv 2511.05664).

Commit the masked tokens whose prediction is both *stable* and *confident*. The rule, as read in
the authors' code (shkim0116/KLASS, ``src/model/llada_klass.py::stable_confident_decode``; the Dream
variant ``src/model/dream_klass.py`` differs where noted):

- Each time a position is predicted, p_t = softmax(logits) over the whole vocabulary ([MASK]
  included, float64) and its divergence from the position's previous prediction is
  KL(p_t || p_prev) = sum_v p_t (log(p_t + 1e-12) - log(p_prev + 1e-12)) (current first).
  The last ``history`` values are kept per position (a shift register).
- A position is *ready* when all of its last ``history`` KL values are < ``kl_threshold``, its
  confidence (probability of the chosen token) is > ``conf_threshold`` (LLaDA's ``>``; Dream's code
  uses ``>=``), it is masked and inside the current block, and the block has run at least
  ``history - 1`` steps (LLaDA's ``step >= kl_history_length - 1`` gate).
- Per row: every ready position is committed (``unmask_strategy=all``, the authors' scripts).
  When none is ready, the fallback is LLaDA's schedule: the ``k`` most confident masked positions
  of the block, ``k`` = LLaDA's transfer count of this block step (n // steps_per_block, the
  remainder to the first steps; 1 per step with the papers' steps = gen_length, as Dream's code,
  which always takes exactly one).
- Blocks of ``block_length`` left to right (one block for the whole batch); a block ends as soon
  as no row has a masked token in it, so the number of forwards is data-dependent, at most
  ``steps``. A row that has finished the block waits for the others, and its predictions of
  those steps are not recorded: alone it would not have made them (its tokens do not change
  meanwhile, so their KL values would be 0 and make its later positions look stable). So with
  full forwards (``cache=none``) a row of a batch decodes as alone; a cache method whose state
  moves with every step (d²Cache, dLLM-Cache) still sees the waiting steps. The authors' loop
  runs at most steps_per_block steps per block and moves on even if the block still has masks
  (possible only when steps < gen_length); here the block's last budgeted step commits every
  masked position left in it (no [MASK] may remain). With steps < gen_length the authors' LLaDA
  fallback also asks ``topk`` for LLaDA's count even when the block has fewer masked positions left,
  which then picks positions at -inf (overwriting decoded tokens or filling another block's masks,
  whichever its tie order gives): not reproduced. At the authors' steps = gen_length neither
  happens (a re-statement of their code gave the same tokens in 42 settings).

What counts as "consecutive steps" when a cache method leaves a prediction stale: in the authors'
code every position is recomputed every step. Here only the positions the loop recomputed this
step get a new distribution and a new KL value; a stale position keeps its history and its last
distribution, so its next KL is against its last *fresh* prediction and ``history`` counts its
recomputations, not loop steps. A position's first prediction has no predecessor: its KL is +inf
(the authors compare with an all-zero distribution, KL ~ 27.6 - H, never below any sensible
threshold), so a position needs ``history + 1`` predictions before it can be ready.

``window`` (which positions get logits and a KL history each step):

- ``rest`` (default, as the authors' code): from the current block's start to the end of the
  response, so that a later block starts with the history its positions gathered meanwhile.
  ``cache=prefix``/``dkv_decode`` recompute those anyway; ``cache=dual`` follows the window and so
  recomputes the rest of the response (it behaves as ``prefix``).
- ``block``: the current block only (what keeps ``cache=dual`` cheap): each block's history starts
  at its first step.

Memory: the previous distribution is kept only for the positions of the window, as a float32
(B, W, V) tensor (W = the response for ``rest``, allocated once; the block for ``block``, dropped
at each block start), with a float64 (B, W, history) KL register: for LLaDA's vocabulary of
126,464 that is 0.5 MB per position and row (130 MB per row for a 256-token response). Float32
storage of p_prev changes a KL by ~1e-8 at most here, far below the thresholds (>= 1e-3) the
authors use.

``fallback_dtype``: ``float64`` (default) ranks the fallback by the confidence above; ``logits`` by
the chosen token's probability under a softmax in the logits' own dtype (float32 here on CPU), as the
authors' Dream code does (``sample_tokens`` on the raw logits, then the first of the maxima): its
rounding can reorder near-ties (probabilities of 0.9999982 and 0.9999983), and so the tokens and
the number of forwards. Their LLaDA code ranks in float64.

Tokens are LLaDA's (greedy, or Gumbel noise on float64 logits with ``temperature`` > 0, [MASK]
never chosen); confidences and KL values come from the noise-free softmax (the authors' code
uses the noisy one at temperature > 0; their scripts run at 0).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ar import check_block_length, check_temperature
from .base import (DecodeContext, Decoder, StepPlan, exclude_token, gumbel_argmax, llada_transfer_counts, on_positions,
                   register_decoder, top_n_mask)

WINDOWS = ("rest", "block")
FALLBACK_DTYPES = ("float64", "logits")
LOG_EPS = 1e-12  # the authors' eps inside both logarithms of the KL


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@register_decoder
class KLASS(Decoder):
    name = "klass"

    def __init__(self, steps: int | None = None, block_length: int | None = 64, conf_threshold: float = 0.9,
                 kl_threshold: float = 0.01, history: int = 2, window: str = "rest", temperature: float = 0.0,
                 fallback_dtype: str = "float64") -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"decoding.steps={steps!r} must be an integer >= 1 (the most forwards; "
                             "null = gen_length)")
        check_block_length(block_length)
        check_temperature(temperature)
        if not _number(conf_threshold) or not 0 <= conf_threshold <= 1:
            raise ValueError(f"decoding.conf_threshold={conf_threshold!r} must be a number in [0, 1] "
                             "(a position is ready when its confidence is > it)")
        if not _number(kl_threshold) or not kl_threshold > 0:
            raise ValueError(f"decoding.kl_threshold={kl_threshold!r} must be a number > 0 (inf allowed: "
                             "a position is stable when its last `history` KL values are < it)")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"decoding.history={history!r} must be an integer >= 1 (the number of "
                             "consecutive KL values that must stay below kl_threshold)")
        if window not in WINDOWS:
            raise ValueError(f"decoding.window={window!r} (allowed: {list(WINDOWS)})")
        if fallback_dtype not in FALLBACK_DTYPES:
            raise ValueError(f"decoding.fallback_dtype={fallback_dtype!r} (allowed: {list(FALLBACK_DTYPES)})")
        super().__init__(steps or 1, block_length, float(temperature))
        self.steps_asked = steps
        self.conf_threshold, self.kl_threshold = float(conf_threshold), float(kl_threshold)
        self.history, self.window, self.fallback_dtype = history, window, fallback_dtype

    def check(self, gen_length: int) -> None:
        self.steps = self.steps_asked or gen_length
        super().check(gen_length)

    def start(self, ctx: DecodeContext) -> None:
        self.steps = self.steps_asked or ctx.gen_length
        super().start(ctx)
        self.current_block, self.block_start_step = -1, 0
        self.base, self.width = ctx.prompt_length, ctx.gen_length
        self.prev: Tensor | None = None  # (B, W, V) float32, allocated at the first propose

    # ------------------------------------------------------------------------------- schedule

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        P, G, T = self.ctx.prompt_length, self.ctx.gen_length, self.ctx.length
        pending = masked[:, P:].reshape(masked.shape[0], G // self.block, self.block).any(2).any(0)
        if not pending.any():
            return None
        block = int(pending.nonzero()[0])
        lo, hi = P + block * self.block, P + (block + 1) * self.block
        if block != self.current_block:
            self.current_block, self.block_start_step = block, step
            self.counts = llada_transfer_counts(masked[:, lo:hi].sum(1), self.steps_per_block)
            if self.window == "block":  # a fresh history for the new block only
                self.base, self.width, self.prev = lo, hi - lo, None
        block_step = step - self.block_start_step
        self.block_window, self.block_step = (lo, hi), block_step
        left = masked[:, lo:hi].sum(1)
        self.waiting = left == 0  # rows done with the block, waiting for the others (see the module doc)
        if block_step >= self.steps_per_block - 1:  # the block's last budgeted step: all that is left
            n_transfer = left
        else:
            n_transfer = (left > 0).long()
        self.fallback = self.counts[:, min(block_step, self.steps_per_block - 1)]
        return StepPlan((lo, T if self.window == "rest" else hi), n_transfer, block, block_step, commit=(lo, hi))

    # --------------------------------------------------------------------------------- tokens

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if positions is None:
            raise ValueError("decoding=klass needs the positions of the logits rows (the loop passes them)")
        tokens = gumbel_argmax(exclude_token(logits, self.ctx.mask_token_id), self.temperature, self.ctx.generator)
        probs = torch.softmax(logits.double(), dim=-1)
        confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
        B, V = self.ctx.batch, probs.shape[-1]
        if self.prev is None:
            dev = probs.device
            self.prev = torch.zeros(B, self.width, V, dtype=torch.float32, device=dev)
            self.seen = torch.zeros(B, self.width, dtype=torch.bool, device=dev)
            self.kl = torch.full((B, self.width, self.history), float("inf"), dtype=torch.float64, device=dev)
        offset = positions - self.base
        valid = (positions < self.ctx.length) & (offset >= 0) & (offset < self.width) & ~self.waiting[:, None]
        rows = torch.arange(B, device=positions.device)[:, None].expand_as(positions)[valid]
        cols = offset[valid]
        p = probs[valid]  # (N, V): the fresh distributions
        kl = (p * (torch.log(p + LOG_EPS) - torch.log(self.prev[rows, cols].double() + LOG_EPS))).sum(-1)
        kl = torch.where(self.seen[rows, cols], kl, torch.full_like(kl, float("inf")))
        register = torch.cat([self.kl[rows, cols, 1:], kl[:, None]], dim=1)
        self.kl[rows, cols] = register
        self.prev[rows, cols] = p.float()
        self.seen[rows, cols] = True
        stable = (register < self.kl_threshold).all(-1) & (self.block_step >= self.history - 1)
        ready = torch.zeros_like(valid)
        ready[valid] = stable & (confidence[valid] > self.conf_threshold)
        self.positions, self.ready = positions, ready
        # What the fallback ranks by: the confidence, or (Dream's code: sample_tokens on the raw logits)
        # the same probability from a softmax in the logits' dtype, whose rounding can reorder near-ties.
        self.fallback_confidence = confidence if self.fallback_dtype == "float64" else (
            torch.softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1).double())
        self.last_kl = torch.full(positions.shape, float("nan"), dtype=torch.float64, device=positions.device)
        self.last_kl[valid] = kl
        return tokens, confidence

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        """The confidence (so cache methods can rank with it); keeps the ready flags, laid onto
        their positions, for :meth:`select`."""
        self.ready_map = on_positions(self.ready, self.positions, confidence.shape[1], fill=False)
        self.fallback_map = on_positions(self.fallback_confidence, self.positions, confidence.shape[1])
        return confidence

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        lo, hi = self.block_window
        in_block = torch.zeros_like(score, dtype=torch.bool)
        in_block[:, lo:hi] = True
        score = score.masked_fill(~in_block, float("-inf"))
        ready = self.ready_map & torch.isfinite(score)
        fallback_score = self.fallback_map.masked_fill(~torch.isfinite(score), float("-inf"))
        chosen = torch.where(ready.any(1, keepdim=True), ready, top_n_mask(fallback_score, self.fallback))
        short = chosen.sum(1, keepdim=True) < plan.n_transfer[:, None]  # the budget's last step: the rest
        return torch.where(short, chosen | top_n_mask(score, plan.n_transfer), chosen)
