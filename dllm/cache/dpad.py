"""DPad: suffix dropout (Chen et al., 2025, arXiv:2508.14148), on top of no cache or a Fast-dLLM cache.

At the start of every block of a block decoder, the masked *suffix* (the positions after the current
block) is thinned once for the whole block: a suffix position at offset ``i`` after the block's end
(``i = 0`` is the first position past the block) is kept with a probability that decays with ``i``
and is zero from ``window`` on. The dropped positions leave the computation until the next block
starts: no row attends to them (they are outside the step's key set) and they are not computed.
Everything up to the block's end (prompt, earlier blocks, the block itself) is always kept.

Retention probability of offset ``i`` (``dropout=gaussian``), with W = ``window``, k = ``k_sigma``,
a = ``scale``, and φ the standard normal density:

- ``distance=reference`` (the authors' ``GaussianSampler``, which produced the published numbers):
  p(i) = a · φ(k · i / (W - 1)) for i < W: the first suffix position at the peak, the window's last
  one at kσ;
- ``distance=paper`` (the paper's formula, d = i + 1 in 1..W): p(i) = a · φ(k · (i + 1) / W).

Each kept position is decided by one uniform draw (``u < p``, from the run's generator), one draw
per suffix position, shared by every row of the batch (the suffix columns of a left-padded batch are
the same absolute positions). ``dropout=uniform`` (the paper's random-pruning ablation) keeps ``keep``
positions drawn uniformly from the window; ``dropout=none`` keeps the whole window (the sliding
window alone). ``window: null`` = the response length.

``base`` composes the dropout with the cache that chooses the rows: ``none`` (every kept position
recomputed each step, the authors' ``generate``), ``prefix`` / ``dual`` (Fast-dLLM's caches,
dllm/cache/fast_dllm.py; their ``refresh_interval`` and ``dream_rows`` pass through): the base's rows
restricted to the kept positions, and the key set = the kept positions, as in the authors'
``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (the block-start forward runs on the
kept positions; dual reads the kept suffix's K/V from it). When a block keeps its whole suffix, the
request is the base's own, so dropout off reproduces ``base`` token for token.

The dropped positions are outside ``ActiveRequest.keys``, which the loop gathers: attention costs
O(kept keys) per query, not a mask over the sequence. A decoder that re-masks (WINO) is refused:
the loop's verification rows attend to every stored position, the never-computed dropped ones too.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dllm.decoding.base import DecodeContext, Decoder

from .base import ActiveRequest, CacheMethod, StepOutcome, StepView, check_interval, register_cache
from .fast_dllm import DREAM_ROWS, DualCache, PrefixCache
from .none import NoCache

DROPOUTS = ("gaussian", "uniform", "none")
DISTANCES = ("reference", "paper")
DRAWS = ("float64", "float32")  # the gaussian dropout's uniform draws: ours | the authors' (see DPad.draw_suffix)
BASES = {"none": NoCache, "prefix": PrefixCache, "dual": DualCache}


def retention(n: int, window: int, k_sigma: float, scale: float, distance: str) -> Tensor:
    """(n,) float64 probability of keeping suffix offset 0..n-1 under the Gaussian distance decay."""
    offset = torch.arange(n, dtype=torch.float64)
    if distance == "reference":  # linspace(0, k, W): offset 0 at the peak, offset W - 1 at k sigma
        x = offset * (k_sigma / (window - 1)) if window > 1 else torch.zeros(n, dtype=torch.float64)
    else:
        x = (offset + 1) * (k_sigma / window)
    p = scale * torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    return p.masked_fill(offset >= window, 0.0)


def retention_float32(n: int, window: int, k_sigma: float, scale: float) -> Tensor:
    """(n,) float32 keep probabilities computed as the authors' GaussianSampler.pdf computes them (in
    float32: linspace(0, k_sigma, window), the density times scale, zeros past the window), so that a
    float32 uniform draw compares against the same values (distance=reference)."""
    x = torch.linspace(0.0, k_sigma, window)
    p = scale * torch.exp(-0.5 * x**2) / torch.sqrt(torch.tensor(2 * torch.pi))
    return torch.cat([p, torch.zeros(max(n - window, 0))])[:n]


def check_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"cache.{name}={value!r} must be a finite number > 0")


@register_cache
class DPad(CacheMethod):
    name = "dpad"

    def __init__(
        self,
        dropout: str = "gaussian",
        window: int | None = 256,
        k_sigma: float = 4.0,
        scale: float = 2.0,
        keep: int | None = None,
        distance: str = "reference",
        base: str = "none",
        refresh_interval: int | None = None,
        dream_rows: str = "ours",
        draw: str = "float64",
    ) -> None:
        if dropout not in DROPOUTS:
            raise ValueError(f"cache.dropout={dropout!r} (allowed: {list(DROPOUTS)})")
        check_interval("window", window, allow_none=True)
        check_number("k_sigma", k_sigma)
        check_number("scale", scale)
        if dropout == "uniform" and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"cache.keep={keep!r} must be an integer >= 0 with cache.dropout=uniform")
        if dropout != "uniform" and keep is not None:
            raise ValueError(f"cache.keep={keep!r} applies to cache.dropout=uniform only; use null")
        if distance not in DISTANCES:
            raise ValueError(f"cache.distance={distance!r} (allowed: {list(DISTANCES)})")
        if draw not in DRAWS:
            raise ValueError(f"cache.draw={draw!r} (allowed: {list(DRAWS)})")
        if draw == "float32" and distance != "reference":
            raise ValueError("cache.draw=float32 reproduces the authors' sampler, whose distance is theirs: "
                             "use it with cache.distance=reference")
        if not isinstance(base, str) or base not in BASES:
            raise ValueError(f"cache.base={base!r} (allowed: {list(BASES)})")
        if base == "none":
            if refresh_interval is not None:
                raise ValueError(f"cache.refresh_interval={refresh_interval!r} applies to cache.base=prefix|dual only "
                                 "(base none recomputes every kept position each step); use null")
            if dream_rows not in DREAM_ROWS:
                raise ValueError(f"cache.dream_rows={dream_rows!r} (allowed: {list(DREAM_ROWS)})")
            self.base: CacheMethod = NoCache()
        else:
            self.base = BASES[base](refresh_interval=refresh_interval, dream_rows=dream_rows)
        self.dropout, self.window, self.k_sigma, self.scale = dropout, window, k_sigma, scale
        self.keep, self.distance, self.draw = keep, distance, draw

    def check(self, decoder: Decoder) -> None:
        if decoder.remasks:
            # The loop's verification rows attend to every stored key, not to the step's key set:
            # they would read the dropped suffix positions, whose K/V were never computed.
            raise ValueError(f"cache=dpad cannot run with decoding={decoder.name!r}: its verification rows attend "
                             "to every stored position, including the suffix positions DPad drops (never computed)")
        self.base.check(decoder)

    def check_model(self, logit_shift: int) -> None:
        self.base.check_model(logit_shift)

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.base.start(ctx)
        self.block_end: int | None = None  # the block the current draw belongs to
        self.kept: Tensor | None = None  # (B, T) bool, the positions of this block's computation
        self.drops = False  # whether this block's draw dropped any suffix position
        self.predictable: Tensor | None = None  # (B, T) bool, kept positions whose predicting row is kept

    def draw_suffix(self, n: int) -> Tensor:
        """(n,) bool: which of the n suffix positions after the block's end this block keeps."""
        window = self.window or self.ctx.gen_length
        device, generator = self.ctx.device, self.ctx.generator
        if self.dropout == "gaussian" and self.draw == "float32":  # the authors' sampler, draw for draw
            p = retention_float32(n, window, self.k_sigma, self.scale).to(device)
            return torch.rand(n, generator=generator, device=device) < p
        if self.dropout == "gaussian":
            p = retention(n, window, self.k_sigma, self.scale, self.distance).to(device)
            return torch.rand(n, dtype=torch.float64, generator=generator, device=device) < p
        kept = torch.zeros(n, dtype=torch.bool, device=device)
        candidates = min(n, window)
        if self.dropout == "none" or self.keep >= candidates:
            kept[:candidates] = True
        else:
            kept[torch.randperm(candidates, generator=generator, device=device)[: self.keep]] = True
        return kept

    def select(self, view: StepView) -> ActiveRequest:
        hi = view.plan.commit_window[1]
        if hi != self.block_end:  # a new block: one draw for all of its steps
            self.block_end = hi
            self.kept = torch.ones_like(view.masked)
            suffix = self.draw_suffix(view.masked.shape[1] - hi)
            self.kept[:, hi:] = suffix
            self.drops = not bool(suffix.all())
            # Predictions the kept rows can make: position j comes from row j - shift (Dream), which
            # must be kept too, or asking for j would compute a dropped row.
            shift = self.ctx.logit_shift
            self.predictable = self.kept.clone()
            if shift:
                self.predictable[:, shift:] &= self.kept[:, :-shift]
        request = self.base.select(view)
        if not self.drops:  # nothing dropped: exactly the base's computation
            return request
        kept = self.kept
        if request.full:
            return ActiveRequest(refresh=kept, keys=kept)
        return ActiveRequest(
            predict=None if request.predict is None else request.predict & self.predictable,
            refresh=None if request.refresh is None else request.refresh & kept,
            layer_hook=request.layer_hook,
            keys=kept,
        )

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        self.base.observe(view, outcome)
