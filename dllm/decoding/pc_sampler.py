"""PC-Sampler (Huang et al., 2025, arXiv 2508.13021): position-aware, confidence-calibrated ranking.

Schedule: LLaDA's (:class:`~dllm.decoding.llada.BlockDecoder`): blocks of ``block_length`` left to
right, ``steps`` split evenly over them, ``n_masked // steps_b`` tokens per step with the remainder
to the first steps. Only the ranking of the block's freshly predicted masked positions changes:

    score(i) = exp(-lambd * (i - lo)) * C(i)

with ``lo`` the first position of the current block (the authors' code takes positions relative
to the decoded slice, the block; the paper writes i - |p0|, the response start: the same order
inside a block, whose positions all share the factor exp(-lambd * (lo - |p0|)); all of the
authors' runs use one block, where both are the same number). ``C(i)``:

- without ``frequencies`` (default): the softmax probability p(i) of the chosen token (as
  ``low_confidence``; ``lambd=0`` is then exactly ``low_confidence``);
- with ``frequencies`` (a token-frequency JSON of a reference corpus): the calibrated score
  C(i) = min(alpha, -p(i) * log(f(x_i) + 1e-9)), f(x_i) the corpus frequency of the chosen token
  (count / num_token); tokens absent from the corpus count once, f = 1 / num_token (the authors'
  ``load_baseline`` / ``pc_sampler_function``). This score is not a probability, so decoders with
  ``frequencies`` set report ``confidence_is_probability = False`` (``cache=d2cache`` refuses them).

``frequencies`` formats: the authors' files (``data/baseline/reference_corpus*.json``:
``{"num_token": N, "p_baseline_dict": {"<id>": count, ...}}``, or ``"token_frequency_dict"`` as
their ``utils/calculate_p_baseline.py`` writes it), or a plain ``{"<id>": count, ...}`` object
(then N = the sum of the counts).

Defaults are the authors' scripts (``scripts/eval_pc_sampler.sh``): lambd 0.25 (0 for Sudoku, 1
for Countdown there), alpha 10, steps = gen_length, one block. In float64 the weight underflows to
0 once lambd * (i - lo) > ~745 (i - lo > 2980 at lambd 0.25); the authors' float32 weight does from
i - lo = 104 at lambd 1 (416 at 0.25), and rounds before that, which can reorder positions whose
weighted scores it makes equal (not reproduced).

``tie_break``: ``row`` (default) takes the k best with one ``torch.topk`` over the row's float64
scores; ``block`` as the authors' code does, ``torch.topk`` over the block's float32 scores. They
differ only among exactly equal scores, whose order torch.topk leaves unspecified: with
``frequencies`` the score is clipped at ``alpha``, so at ``lambd`` 0 (the authors' Sudoku runs) many
positions tie at ``alpha`` and the two pick differently.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from .base import DecodeContext, StepPlan, check_tie_break, register_decoder, top_n_by
from .llada import BlockDecoder

#: the epsilon inside the log of the authors' calibrated score
LOG_EPS = 1e-9
DEFAULT_ALPHA = 10.0  # the authors' clip


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_frequencies(path: str) -> tuple[dict[int, float], float]:
    """Token id -> count and the corpus size N from a frequency JSON (see the module docstring)."""
    key = f"decoding.frequencies={path!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{key}: no such file (a JSON of token id -> count, or the PC-Sampler authors' "
                         "{\"num_token\": N, \"p_baseline_dict\": {...}})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}: not a JSON file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{key}: expected a JSON object of token id -> count")
    total = None
    if "num_token" in data:
        table = data.get("p_baseline_dict", data.get("token_frequency_dict"))
        if not isinstance(table, dict):
            raise ValueError(f"{key}: has num_token but no p_baseline_dict / token_frequency_dict object")
        total = data["num_token"]
        if not _number(total) or not math.isfinite(total) or total <= 0:
            raise ValueError(f"{key}: num_token={total!r} must be a number > 0")
    else:
        table = data
    counts: dict[int, float] = {}
    for token, count in table.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: key {token!r} is not a token id") from None
        if token_id < 0:
            raise ValueError(f"{key}: token id {token_id} must be >= 0")
        if not _number(count) or not math.isfinite(count) or count < 0:
            raise ValueError(f"{key}: the count of token {token_id} ({count!r}) must be a number >= 0")
        counts[token_id] = float(count)
    if total is None:
        total = sum(counts.values())
        if total <= 0:
            raise ValueError(f"{key}: the counts sum to {total}; nothing to take frequencies from")
    return counts, float(total)


@register_decoder
class PCSampler(BlockDecoder):
    name = "pc_sampler"

    def __init__(self, steps: int, block_length: int | None = None, lambd: float = 0.25, alpha: float = DEFAULT_ALPHA,
                 frequencies: str | None = None, temperature: float = 0.0, tie_break: str = "row") -> None:
        super().__init__(steps, block_length, temperature)
        check_tie_break(tie_break)
        self.tie_break = tie_break
        if not _number(lambd) or not math.isfinite(lambd) or lambd < 0:
            raise ValueError(f"decoding.lambd={lambd!r} must be a finite number >= 0 (0 = no positional weighting; "
                             "the authors use 0 to 1, 0.25 by default)")
        if not _number(alpha) or math.isnan(alpha) or alpha <= 0:
            raise ValueError(f"decoding.alpha={alpha!r} must be a number > 0 (the clip of the calibrated score; "
                             "the authors use 10)")
        if frequencies is not None and not isinstance(frequencies, str):
            raise ValueError(f"decoding.frequencies={frequencies!r} must be a path to a JSON file or null")
        if frequencies is None and alpha != DEFAULT_ALPHA:
            raise ValueError(f"decoding.alpha={alpha} clips the calibrated score, which needs decoding.frequencies "
                             "(a token-frequency JSON); without it the score is the probability alone")
        self.lambd, self.alpha, self.frequencies = float(lambd), float(alpha), frequencies
        self.corpus_counts: dict[int, float] | None = None
        if frequencies is not None:
            self.corpus_counts, self.total = load_frequencies(frequencies)
            self.confidence_is_probability = False  # C in [0, alpha], not a probability
        self.table: Tensor | None = None

    def start(self, ctx: DecodeContext) -> None:
        super().start(ctx)
        self.origin = ctx.prompt_length

    def plan(self, step: int, masked: Tensor) -> StepPlan | None:
        plan = super().plan(step, masked)
        if plan is not None:
            self.origin = plan.window[0]
        return plan

    def check_vocab(self, vocab_size: int) -> None:
        too_large = [t for t in self.corpus_counts if t >= vocab_size] if self.frequencies is not None else []
        if too_large:
            raise ValueError(f"decoding.frequencies={self.frequencies!r}: token id {min(too_large)} is outside "
                             f"the model's vocabulary of {vocab_size}")

    def frequency_table(self, vocab: int, device: torch.device) -> Tensor:
        """(V,) float64 corpus frequency of every token id (1 / N where the corpus lacks it)."""
        if self.table is None or self.table.shape[0] != vocab or self.table.device != device:
            self.check_vocab(vocab)
            table = torch.full((vocab,), 1.0 / self.total, dtype=torch.float64)
            if self.corpus_counts:
                ids = torch.tensor(list(self.corpus_counts), dtype=torch.long)
                table[ids] = torch.tensor(list(self.corpus_counts.values()), dtype=torch.float64) / self.total
            self.table = table.to(device)
        return self.table

    def propose(self, logits: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens, probability = super().propose(logits, positions)
        if self.corpus_counts is None:
            return tokens, probability
        freq = self.frequency_table(logits.shape[-1], logits.device)[tokens]
        return tokens, (-probability * torch.log(freq + LOG_EPS)).clamp(max=self.alpha)

    def priority(self, confidence: Tensor, masked: Tensor) -> Tensor:
        distance = (torch.arange(confidence.shape[1], device=confidence.device, dtype=torch.float64) - self.origin)
        return torch.exp(-self.lambd * distance.clamp(min=0))[None, :] * confidence

    def select(self, score: Tensor, plan: StepPlan) -> Tensor:
        return top_n_by(self.tie_break, score, plan.n_transfer, plan.window)
