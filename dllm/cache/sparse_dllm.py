"""Sparse-dLLM (Song et al., 2025, arXiv:2508.02558): attention-guided eviction of prefix and
suffix keys with a delayed, block-wise cache update.

For each block [lo, hi) of a block decoder (the plan's window), by block step s:

- s < ``delay``: a full forward, every key attended (the paper delays the cache update by one
  step to stabilise the selection).
- s == ``delay`` (1: the paper's one-step delay), and with ``update_interval`` u also
  s == delay + u, delay + 2u, ...: a full forward, every key attended; afterwards, per layer,
  every real position outside the block (prompt, earlier blocks, the still-masked later blocks)
  is scored by the attention the block's rows paid it in that forward (head-averaged, averaged
  over the block's rows), the scores are max-pooled over neighbouring candidates
  (``kernel_size``; neighbours in the candidate sequence, so the pool reaches across the block)
  and the top floor(``keep_ratio`` x candidates) candidates of the row survive (ties: the
  earlier position first; ``tie_break=topk``: as ``torch.topk`` orders them, the authors' call —
  the pooling copies a maximum onto its neighbours, so exact ties at the cut-off are common).
- other steps: only the block is recomputed (Dream: plus row lo - 1 while lo is masked, to
  predict it). Every computed row attends, per layer, to the surviving keys, whose K/V stay as
  the selecting forward wrote them (evicted ones are never recomputed nor read), and to the
  block's own freshly computed keys.

``score`` says what "attention paid" means: ``attention`` (default, the paper's
"attention-guided" wording) uses the softmax attention probabilities the loop reports;
``mean_query`` is the authors' code (``CustomCache.filter_cache``): the unscaled logit of the
block rows' *mean* query against each key, averaged over query heads, before any softmax.

The key set reaches the loop as per-layer (B, T) masks (``ActiveRequest.keys``), which gathers
the selected K/V: attention costs O(kept keys) per query, not a mask over all positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm.models.transformer import LayerHook, apply_rope, rope_cos_sin

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache

SCORES = ("attention", "mean_query")
TIE_BREAKS = ("earlier", "topk")


def block_scores(attention: Tensor, rows: Tensor, rows_valid: Tensor, lo: int, hi: int) -> Tensor:
    """(B, T) importance of each position: the head-averaged attention (B, A, T) of the forward's
    rows (``rows`` (B, A) their positions), averaged over the rows at positions [lo, hi)."""
    weight = (rows_valid & (rows >= lo) & (rows < hi)).to(attention.dtype)
    return (attention * weight[:, :, None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)


def keep_keys(scores: Tensor, candidates: Tensor, keep_ratio: float, kernel_size: int, tie_break: str = "earlier"
              ) -> Tensor:
    """(B, T) bool: the candidates that survive eviction.

    Per row, the candidates' scores in position order are max-pooled (window ``kernel_size``,
    stride 1, the candidate sequence's ends padded with -inf) and the floor(keep_ratio x n)
    highest of the n candidates are kept. ``tie_break``: ``earlier`` keeps the earlier of equal
    scores; ``topk`` keeps whichever ``torch.topk`` returns for the row's (1, n) candidate scores,
    as the authors' code calls it (its order among ties is torch's, and may differ by device).
    """
    T = candidates.shape[1]
    # Candidates first, in position order: the row's candidate sequence, -inf after its end.
    order = torch.argsort((~candidates).to(torch.int8), dim=1, stable=True)
    packed_valid = candidates.gather(1, order)
    packed = scores.float().gather(1, order).masked_fill(~packed_valid, float("-inf"))
    if kernel_size > 1:
        packed = F.max_pool1d(packed[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
        packed = packed.masked_fill(~packed_valid, float("-inf"))
    n_keep = torch.floor(candidates.sum(1).double() * keep_ratio).long()  # as int(n * ratio)
    if tie_break == "topk":  # once per block and layer; the reference is batch 1, a row at a time here
        n_candidates = packed_valid.sum(1).tolist()
        ranked = torch.zeros_like(order)
        for row, (n, keep) in enumerate(zip(n_candidates, n_keep.tolist())):
            top = torch.topk(packed[row:row + 1, :n], keep, dim=-1).indices[0]
            rest = torch.ones(T, dtype=torch.bool, device=scores.device)
            rest[top] = False
            ranked[row] = torch.cat([top, rest.nonzero()[:, 0]])
    else:
        ranked = torch.sort(packed, dim=1, descending=True, stable=True).indices
    chosen = torch.arange(T, device=scores.device)[None, :] < n_keep[:, None]
    keep_packed = torch.zeros_like(candidates).scatter(1, ranked, chosen)
    return torch.zeros_like(candidates).scatter(1, order, keep_packed & packed_valid)


class MeanQueryScores(LayerHook):
    """The authors' importance score, formed during a full forward that it leaves unchanged.

    Every row is computed at every layer as usual (the hook picks them all and merges nothing);
    besides, per layer, it projects the rows' queries and keys as attention does (QK-norm, RoPE)
    and scores each position by (mean of the block rows' query) . key, averaged over query heads.
    """

    def __init__(self, positions: Tensor, lo: int, hi: int) -> None:
        self.positions, self.lo, self.hi = positions, lo, hi
        self.scores: list[Tensor] = []  # per layer (B, T)

    def begin(self, rows: Tensor, rows_valid: Tensor, required: Tensor) -> None:
        self.rows, self.rows_valid = rows, rows_valid
        self.token_layers = 0.0
        self.scores = []

    def pick(self, layer: int, block, x_norm: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        attn, (B, A, _) = block.attn, x_norm.shape
        a = attn.args
        T = self.positions.shape[1]
        self.token_layers += float(self.rows_valid.sum())  # every row, in full
        q = attn.wq(x_norm).view(B, A, a.n_heads, a.head_dim)
        k = attn.wk(x_norm).view(B, A, a.n_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = rope_cos_sin(self.positions.gather(1, self.rows.clamp(max=T - 1)), a.rotary_dim, a.rope_theta, x_norm.dtype)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        weight = (self.rows_valid & (self.rows >= self.lo) & (self.rows < self.hi)).to(q.dtype)
        mean_q = (q * weight[:, None, :, None]).sum(2) / weight.sum(1).clamp(min=1)[:, None, None]
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        score = torch.einsum("bhd,bhad->ba", mean_q, k) / a.n_heads
        self.scores.append(torch.zeros(B, T + 1, dtype=score.dtype, device=score.device)
                           .scatter(1, self.rows, score.masked_fill(~self.rows_valid, 0))[:, :T])
        every = torch.arange(A, device=x_norm.device).expand(B, A)
        return every, self.rows_valid, None

    def merge(self, layer: int, part: str, picked: Tensor, picked_valid: Tensor, fresh: Tensor) -> Tensor:
        return fresh


@register_cache
class SparseDLLM(CacheMethod):
    name = "sparse_dllm"

    def __init__(self, keep_ratio: float = 0.5, kernel_size: int = 3, update_interval: int | None = None,
                 delay: int = 1, score: str = "attention", tie_break: str = "earlier") -> None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"cache.keep_ratio={keep_ratio!r} must be a number in (0, 1]")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"cache.kernel_size={kernel_size!r} must be an odd integer >= 1 (1 = no pooling)")
        check_interval("update_interval", update_interval, allow_none=True)
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"cache.delay={delay!r} must be an integer >= 0 (block steps before the first selection)")
        if score not in SCORES:
            raise ValueError(f"cache.score={score!r} (allowed: {list(SCORES)})")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"cache.tie_break={tie_break!r} (allowed: {list(TIE_BREAKS)})")
        self.keep_ratio = float(keep_ratio)
        self.score, self.tie_break = score, tie_break
        # The paper's score reads the loop's attention statistics; the code's comes from a hook.
        self.needs_attention = score == "attention"
        self.kernel_size = kernel_size
        self.update_interval = update_interval
        self.delay = delay

    def start(self, ctx) -> None:
        super().start(ctx)
        self.kept: list[Tensor] | None = None  # per layer (B, T) bool, the surviving keys of the block
        self.positions = (ctx.real.long().cumsum(1) - 1).clamp(min=0)  # RoPE positions, as the loop's
        self.hook: MeanQueryScores | None = None

    def selects(self, block_step: int) -> bool:
        """True for the block steps whose full forward chooses the keys of the following steps."""
        since = block_step - self.delay
        if since < 0:
            return False
        return since == 0 or (self.update_interval is not None and since % self.update_interval == 0)

    def select(self, view: StepView) -> ActiveRequest:
        block_step = view.plan.block_step
        if self.selects(block_step) and self.score == "mean_query":
            self.hook = MeanQueryScores(self.positions, *view.plan.window)
            return ActiveRequest(full=True, layer_hook=self.hook)
        if block_step < self.delay or self.selects(block_step):
            return ActiveRequest.everything()
        lo, hi = view.plan.window
        block = torch.zeros_like(view.masked)
        block[:, lo:hi] = True
        return ActiveRequest(predict=view.masked & block, refresh=block, keys=[kept | block for kept in self.kept])

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        if not self.selects(view.plan.block_step):
            return
        lo, hi = view.plan.window
        T = view.masked.shape[1]
        if self.score == "mean_query":
            scores = self.hook.scores
        elif outcome.attention is None:
            raise RuntimeError(f"cache={self.name!r} needs the attention statistics of its selecting forwards")
        else:
            scores = [block_scores(a[:, :, :T], outcome.rows, outcome.rows_valid, lo, hi) for a in outcome.attention]
        outside = torch.ones_like(view.masked)
        outside[:, lo:hi] = False
        candidates = self.ctx.real & outside
        self.kept = [keep_keys(s, candidates, self.keep_ratio, self.kernel_size, self.tie_break) for s in scores]
