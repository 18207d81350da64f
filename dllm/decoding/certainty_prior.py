"""d²Cache's certainty-prior decoding: confidence weighted by the density of decoded context."""
from __future__ import annotations

from torch import Tensor

from .base import register_decoder
from .density import DENSITY_VARIANTS, certainty_density, check_sigma
from .llada import BlockDecoder


@register_decoder
class CertaintyPrior(BlockDecoder):
    """score(i) = confidence(i) x D(i) over the whole response (block_length = gen_length).

    Small sigma decodes nearly left to right; large sigma approaches non-autoregressive order.
    """

    name = "certainty_prior"

    def __init__(self, steps: int, sigma: float = 10.0, density: str = "sum", temperature: float = 0.0,
                 block_length: int | None = None) -> None:
        if block_length is not None:
            raise ValueError("decoding=certainty_prior decodes the whole response as one block: leave block_length null")
        super().__init__(steps, None, temperature)
        sigma = check_sigma("decoding.sigma", sigma)
        if density not in DENSITY_VARIANTS:
            raise ValueError(f"decoding.density={density!r} (allowed: {list(DENSITY_VARIANTS)})")
        self.sigma = sigma
        self.density = density

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        known = self.ctx.real & ~masked
        return confidence * certainty_density(known, self.ctx.real, self.sigma, self.density)
