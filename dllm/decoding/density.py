"""Certainty density D(i) of d²Cache: how much decoded context surrounds position i."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

DENSITY_VARIANTS = ("sum", "fraction")
# sigma's range: below it the kernel is already the identity (exp(-1/(2 sigma^2)) is 0 in float32 for
# sigma < 0.08), and a smaller one underflows sigma^2 (0/0 on the diagonal); above it the density is
# already flat over any response, and `fraction` would lay out ceil(3 sigma) virtual positions.
SIGMA_RANGE = (1e-6, 1e4)


def check_sigma(key: str, sigma) -> float:
    """``sigma`` as a float, or ValueError naming ``key`` (cache.sigma, decoding.sigma) and the range."""
    low, high = SIGMA_RANGE
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not low <= sigma <= high:
        raise ValueError(f"{key}={sigma!r} must be a number in [{low:g}, {high:g}] (the Gaussian's width in positions)")
    return float(sigma)


@lru_cache(maxsize=8)
def gaussian_kernel(length: int, sigma: float, device: torch.device) -> Tensor:
    """K[i, j] = exp(-(i-j)^2 / (2 sigma^2)); cached because every step of a generation reuses it."""
    pos = torch.arange(length, device=device, dtype=torch.float32)
    return torch.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2 * sigma**2))


def certainty_density(known: Tensor, real: Tensor, sigma: float, variant: str = "sum") -> Tensor:
    """D (B, T) for known (B, T) bool (prompt + decoded tokens) and real (B, T) bool (not padding).

    ``sum`` (the paper): D(i) = sum over known j of exp(-(i-j)^2 / (2 sigma^2)).
    ``fraction`` (the reference code's normalised variant, our reading of it): the
    Gaussian-weighted fraction of known positions among the real ones, where ceil(3 sigma)
    virtual positions past the end count as known once the last response token is known.
    """
    if variant not in DENSITY_VARIANTS:
        raise ValueError(f"density={variant!r} (allowed: {list(DENSITY_VARIANTS)})")
    B, T = known.shape
    if variant == "sum":
        return known.float() @ gaussian_kernel(T, sigma, known.device)
    tail = math.ceil(3 * sigma)
    end_known = known[:, -1:].expand(B, tail)
    known_ext = torch.cat([known, end_known], dim=1).float()
    real_ext = torch.cat([real, torch.ones_like(end_known)], dim=1).float()
    kernel = gaussian_kernel(T + tail, sigma, known.device)[:, :T]
    return (known_ext * real_ext) @ kernel / (real_ext @ kernel)
