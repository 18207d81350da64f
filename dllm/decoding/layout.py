"""Where prompts and responses sit in the (B, T) grid the denoising loop decodes, and which keys
each row may attend to.

Bidirectional models (LLaDA, Dream): prompts are left-padded to a common width P and every row's
response is columns [P, P + G).

Block-diffusion models (SDAR, TraDo, LLaDA2.0; ``ModelArgs.block_causal``): attention is
bidirectional inside a block of ``block`` positions and causal across blocks, with blocks counted
from each sequence's first token, so a prompt's last ``len % block`` tokens share the first
decoded block with the first response tokens (as the authors' generation code does it). Rows are
left-padded by whole blocks so that every row's blocks occupy the same columns (block boundaries
are the multiples of ``block``): the decoded region starts at the common block boundary S, row b's
response starts at column
``S + len_b % block``, and the region runs to the end of the last block any row needs. Columns
after a row's G tokens are decoded like the rest (they come after its response, so under causal
attention across blocks they cannot change it) and dropped from the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Layout:
    x: Tensor  # (B, T) long: prompt tokens, padding, [MASK] in the decoded region
    real: Tensor  # (B, T) bool: False on padding
    region_start: int  # S: the first column of the decoded region (a block boundary)
    response_start: Tensor  # (B,) long: each row's first response column
    response_length: int  # G

    @property
    def region_length(self) -> int:
        return self.x.shape[1] - self.region_start

    def response(self, x: Tensor) -> Tensor:
        """(B, G) the rows' response columns of ``x`` (B, T)."""
        cols = self.response_start[:, None] + torch.arange(self.response_length, device=x.device)[None, :]
        return x.gather(1, cols)


def grid_width(lengths: list[int], gen_length: int, block: int | None = None) -> int:
    """Columns of :func:`lay_out`'s grid for prompts of these lengths: what must fit the model's
    ``max_seq_len``. With ``block``, prompts that fit alone may not fit together (the widest whole-
    block prefix beside the most blocks any row's partial block and response need)."""
    if block is None:
        return max(lengths) + gen_length
    return max(n // block for n in lengths) * block + max(-(-(n % block + gen_length) // block) for n in lengths) * block


def prompt_room(max_seq_len: int, gen_length: int, block: int | None = None) -> int:
    """The longest prompt whose grid alone fits ``max_seq_len`` (with ``block``: prompt and response
    take whole blocks together, ceil((n + G) / block) of them)."""
    return (max_seq_len if block is None else max_seq_len // block * block) - gen_length


def lay_out(prompts: list[list[int]], gen_length: int, mask_id: int, pad_id: int, device,
            block: int | None = None) -> Layout:
    """The grid for ``prompts`` and ``gen_length`` response tokens; ``block``: the attention block
    of a block-diffusion model (None: a bidirectional model, plain left padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = [len(p) for p in prompts]
    width = grid_width(lengths, gen_length, block)
    if block is None:
        region_start = max(lengths)
        start = [region_start] * len(prompts)
    else:
        # Whole prompt blocks go before S, each prompt's partial last block after it.
        region_start = max(n // block for n in lengths) * block
        start = [region_start + n % block for n in lengths]
    x = torch.full((len(prompts), width), mask_id, dtype=torch.long)
    real = torch.ones_like(x, dtype=torch.bool)
    for row, (prompt, first) in enumerate(zip(prompts, start)):
        pad = first - len(prompt)
        x[row, :pad] = pad_id
        x[row, pad:first] = torch.tensor(prompt, dtype=torch.long)
        real[row, :pad] = False
    return Layout(x.to(device), real.to(device), region_start, torch.tensor(start, device=device), gen_length)


def attention_rank(real: Tensor, block: int) -> Tensor:
    """(B, T) block index of every column, counted from each row's first token: a query attends
    to the (real) keys whose rank is at most its own."""
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return positions // block


def block_causal_mask(rank: Tensor, key_mask: Tensor, rows: Tensor) -> Tensor:
    """(B, 1, A, T + 1) bool: ``key_mask`` (B, 1, 1, T + 1) restricted, for each of the forward's
    rows (B, A; padding rows hold T), to keys of its block and earlier ones. The mask has one line
    per computed row only, never one per position of the sequence."""
    # The trash slot (column T) ranks after everything: padding rows, which sit there, see every
    # real key (no all-masked softmax row to produce NaNs), and no real row sees it.
    ranks = torch.cat([rank, rank.new_full((rank.shape[0], 1), rank.shape[1])], 1)
    row_rank = ranks.gather(1, rows)
    return key_mask & (ranks[:, None, None, :] <= row_rank[:, None, :, None])


def shift_to_computing(predict: Tensor, shift: int) -> Tensor:
    """Positions whose forward yields the predictions of ``predict`` (j -> j - shift)."""
    if shift == 0:
        return predict
    computing = torch.zeros_like(predict)
    computing[:, :-shift] = predict[:, shift:]
    return computing


def blocks_of(columns: Tensor, block: int) -> Tensor:
    """(B, T) bool: every column of each attention block that holds a column of ``columns`` (B, T).
    In a block-diffusion layout block boundaries are the columns that are multiples of ``block``."""
    B, T = columns.shape
    return columns.view(B, T // block, block).any(2).repeat_interleave(block, dim=1)
