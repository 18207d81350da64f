"""The cache-method protocol.

Before each forward a method says which positions must be recomputed (:meth:`CacheMethod.select`);
after the decoder has acted it sees what happened (:meth:`CacheMethod.observe`). Everything else
(the K/V store, ragged batches, Dream's logit shift, which positions may be unmasked) is done by
the denoising loop, identically for every method.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from dllm.decoding.base import DecodeContext, Decoder, StepPlan
from dllm.models.transformer import LayerHook
from dllm.registry import Registry


@dataclass
class ActiveRequest:
    """What to recompute in the next forward; ``full`` means every position.

    predict: (B, T) bool, positions whose *predictions* must be fresh (the loop turns position j
        into the computing position j - 1 for Dream).
    refresh: (B, T) bool, positions whose keys/values must be recomputed.
    """

    full: bool = False
    predict: Tensor | None = None
    refresh: Tensor | None = None
    #: optional per-layer partial recomputation over the active rows (see LayerHook).
    layer_hook: LayerHook | None = None
    #: the positions every computed row attends to this step: (B, T) bool for every layer, or a
    #: list of one per layer; None = every real position. The loop restricts them to real positions
    #: and gathers their K/V, so attention costs O(selected keys), not a mask over all of them.
    keys: Tensor | list[Tensor] | None = None
    #: (B, T) bool, the masked positions this step may unmask; None = every one the forward predicts
    #: inside the decoder's window. For a method that decodes over a window of its own (Elastic-Cache's
    #: sliding window), also in a forward that computes more (its step 0).
    commit: Tensor | None = None

    @classmethod
    def everything(cls) -> "ActiveRequest":
        return cls(full=True)


@dataclass
class StepView:
    """State of the generation seen by a cache method (read-only by convention)."""

    step: int
    plan: StepPlan
    x: Tensor  # (B, T) current tokens
    masked: Tensor  # (B, T) bool, still-masked positions


@dataclass
class StepOutcome:
    """What one step did; given to :meth:`CacheMethod.observe`."""

    active: Tensor  # (B, T) bool, positions computed in this forward
    transferred: Tensor  # (B, T) bool, positions unmasked this step
    confidence: Tensor  # (B, T) float, fresh confidence of recomputed masked positions, NaN elsewhere
    rows: Tensor  # (B, A) positions of the computed rows (padding rows hold T)
    rows_valid: Tensor  # (B, A) bool
    attention: list[Tensor] | None  # per layer (B, A, T) head-averaged attention, if asked
    #: (B, T) bool, committed positions a re-masking decoder took back this step (None: none can)
    remasked: Tensor | None = None


class CacheMethod(ABC):
    name: str = ""
    #: the loop forms per-layer attention rows only for methods that set this.
    needs_attention: bool = False
    #: True for a method whose every step is a full forward (what classifier-free guidance needs).
    full_every_step: bool = False
    #: True for a method that runs on block-diffusion models (block-causal attention): there the loop
    #: keeps finished blocks' K/V exact and never computes later blocks, and the method chooses
    #: what to recompute inside the current block.
    block_causal: bool = False

    def check(self, decoder: Decoder) -> None:
        """Raise ValueError if this method cannot run with ``decoder``."""

    def check_model(self, logit_shift: int) -> None:
        """Raise ValueError if this method cannot run on a model with this logit shift (1: Dream);
        called from the checkpoint's config.json before the weights load, and at :meth:`start`."""

    def check_attention(self, block_causal: bool) -> None:
        """Raise ValueError if this method's settings have no meaning on a model with block-causal
        attention (a block-diffusion model, one it runs on: ``block_causal``) or on one without;
        called before the weights load, and when a generation starts."""

    def start(self, ctx: DecodeContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def select(self, view: StepView) -> ActiveRequest:
        """Positions to recompute in the forward of ``view.step``."""

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        """Update the method's state after the step."""


def check_interval(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"cache.{name}={value!r} must be an integer >= 1" + (" or null" if allow_none else ""))


REGISTRY: Registry[CacheMethod] = Registry("cache", "dllm.cache")
register_cache = REGISTRY.register
cache_names = REGISTRY.names
build_cache = REGISTRY.build
