"""Re-scoring committed tokens with the token hidden: the "shadow block" of WINO (arXiv 2507.18578).

For each position j of a window [lo, hi), an extra query row holds [MASK] at j's RoPE position.
It attends to every real key except position j's own (so it cannot read the token it checks) and
to all shadow rows of the window (which play the role of j masked); no real position attends to
a shadow row, so the real forward is unchanged. The probability the shadow row gives to the token
now at j is that token's *verification confidence*.

The shadow rows run after the step's forward, on the K/V store that forward left behind: at
every layer the store then holds exactly the keys the real rows read at that layer, so this is
the same computation as the authors' one forward over [sequence | shadow block] with their
attention mask. Shadow K/V go to a temporary store and never into the generation's store.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dllm.models.transformer import KVStore, Transformer


class ShadowStore:
    """Reads a generation's K/V store and appends the shadow rows' own K/V, never writing to it."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    def write(self, layer: int, index: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([self.store.k[layer], k], dim=2), torch.cat([self.store.v[layer], v], dim=2)

    def key_mask(self, layer: int, key_mask: Tensor) -> Tensor:
        return key_mask


def verification_confidence(net: Transformer, x: Tensor, positions: Tensor, key_mask: Tensor, store: KVStore,
                            window: tuple[int, int]) -> Tensor:
    """(B, T) float64: for each committed position of ``window``, the probability its current token
    gets from a query that cannot see it; NaN elsewhere (masked positions, outside the window).

    x, positions: (B, T + 1) tokens and RoPE positions (column T the loop's trash slot);
    key_mask: (B, 1, 1, T + 1) real keys; store: the K/V store after this step's forward.
    """
    lo, hi = window
    B, T = x.shape[0], x.shape[1] - 1
    width = hi - lo
    mask_id = net.args.mask_token_id
    own = torch.zeros(width, T + 1, dtype=torch.bool, device=x.device)
    own[:, lo:hi] = torch.eye(width, dtype=torch.bool, device=x.device)
    real_keys = key_mask.expand(B, 1, width, T + 1) & ~own
    shadow_keys = torch.ones(B, 1, width, width, dtype=torch.bool, device=x.device)
    shadow_tokens = torch.full((B, width), mask_id, dtype=torch.long, device=x.device)
    hidden, _ = net.hidden(shadow_tokens, positions[:, lo:hi], torch.cat([real_keys, shadow_keys], -1),
                           ShadowStore(store))
    probs = torch.softmax(net.output(hidden).double(), dim=-1)
    current = x[:, lo:hi]
    confidence = probs.gather(-1, current[..., None]).squeeze(-1)
    out = torch.full((B, T), float("nan"), dtype=torch.float64, device=x.device)
    out[:, lo:hi] = confidence.masked_fill(current == mask_id, float("nan"))
    return out
