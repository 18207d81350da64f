"""Token, time and compute totals of a run, aggregated over generation batches.

Every rate is a ratio of totals (never a mean of per-batch or per-sample ratios), so a run's
numbers do not depend on how its samples were split into batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type: keeps this module free of the torch import
    from dllm.decoding.loop import GenerationOutput


@dataclass
class SampleStats:
    useful_tokens: int  # response tokens up to and including the first EOS
    all_tokens: int  # response tokens generated for the row (G; fewer when stop_at_eos stopped it)
    seconds: float  # wall time of the batch the sample was generated in (its latency)
    mask_tokens: int = 0  # [MASK] tokens left in the response (0 unless a method/decoder is broken)
    remasked_tokens: int = 0  # committed tokens a re-masking decoder took back (each time)


def token_layer_flops(args) -> int:
    """FLOPs of one position through one layer's linear layers (2 per multiply-add), averaged over
    the layers: the q/k/v/o projections and the FFN (for a mixture of experts: the router, the
    experts a row uses and any shared experts; the leading dense layers of LLaDA2.0 at their width)."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    experts = getattr(args, "n_experts", 0)
    if not experts:
        return 2 * (attention + 3 * args.dim * args.ffn_dim)
    per_row = getattr(args, "n_experts_per_token", 0) + getattr(args, "n_shared_experts", 0)
    moe = args.dim * experts + 3 * args.dim * args.ffn_dim * per_row
    dense_layers = getattr(args, "n_dense_layers", 0)
    dense = 3 * args.dim * getattr(args, "dense_ffn_dim", 0)
    # Integer mean over layers (off by under one FLOP per token-layer when the layers differ).
    ffn = (dense_layers * dense + (args.n_layers - dense_layers) * moe) // args.n_layers
    return 2 * (attention + ffn)


def attention_pair_flops(args) -> int:
    """FLOPs of one query attending to one key in one layer: q.k and the weighted value, every head."""
    return 4 * args.n_heads * args.head_dim


def kv_bytes_per_token(args, element_bytes: int) -> int:
    """Bytes of one position's keys and values over all layers."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * element_bytes


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof 1); None for a single value."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


class ThroughputMeter:
    """Accumulates :class:`GenerationOutput` batches into the speed fields of the run record.

    ``summary()`` keys match :class:`dllm.logging.record.RunRecord` field names, so
    ``RunRecord(..., **meter.summary())`` fills them. Definitions:

    - ``useful_tokens`` / ``all_tokens``: sums over samples (useful: up to and including the
      first EOS, no padding, no prompt; all: gen_length per row).
    - ``gen_seconds``: sum of batch generation times (each batch counted once, not per row).
    - ``throughput_*_tok_s``: token total / ``gen_seconds``.
    - ``latency_s_*``: over samples, a sample's latency being its batch's wall time.
    - ``nfe``: total batched forward passes.
    - ``tokens_per_forward``: response tokens committed per forward per row,
      ``sum_b(B_b * G_b) / sum_b(B_b * nfe_b)`` = all_tokens / row-forwards. It does not grow
      with batch size (a batch forward advances every row), e.g. 1.0 for one token per step and
      G / steps in general; > 1 means parallel decoding.
    - ``recompute_ratio``: sum of active token-layers / sum of full-forward token-layers over
      batches; ``ideal_speedup`` = 1 / recompute_ratio.
    - ``peak_mem_gb``: max over batches.
    - ``timing_repeats``: how often each batch was timed (``timing.repeats``; the tokens of every
      repeat are the same, only the first is scored). ``gen_seconds`` is then the mean over repeats
      of the run's total generation time, and ``throughput_*_tok_s_std`` the standard deviation
      (ddof 1) over repeats of the run's throughput (None with one repeat).
    - ``mask_tokens_left``: [MASK] tokens left in the responses (the denoising loop refuses to
      return any, so this is 0 in every valid run; the tokenizer would drop them from the text).
    - ``remasked_tokens``: committed tokens a re-masking decoder (WINO) took back, summed over
      samples and counted every time; the token totals above count only final tokens.
    - ``attention_ratio``: sum of computed queries x attended keys (over layers and forwards) / the
      same with every position recomputed attending to every real key. ``ideal_speedup_attention``:
      full-forward FLOPs / the run's FLOPs, linear layers and attention together (2 FLOPs per
      multiply-add; the bound beside the linear one, for methods that save attention by choosing keys).
    - ``peak_kv_gb``: the most K/V a forward attended to (rows summed, layers averaged), in GB: the
      store a method that keeps only its key set would need.
    - ``compile_seconds`` / ``recompiles`` (compiled layers, ``compile: true``): time spent compiling
      new graphs and their number, over every batch *including* the warm-up (where most of it
      happens); it is left out of every generation's seconds, so of the throughputs.
    - ``padding_ratio``: token-layers computed only because a compiled forward padded its active rows
      to a bucket / full-forward token-layers, the denominator of ``recompute_ratio``: a compiled run
      computes recompute_ratio + padding_ratio of the full forwards' rows.

    Warm-up batches (``warmup=True``) are generated but left out of every total. Fields that
    are undefined while nothing was counted (rates, latencies, ratios, memory) are ``None``.
    """

    def __init__(self) -> None:
        self.samples: list[SampleStats] = []
        self.gen_seconds = 0.0
        self.nfe = 0
        self.row_forwards = 0
        self.active_token_layers = 0
        self.total_token_layers = 0
        self.peak_mem_gb: float | None = None
        self.attention_pairs = self.total_attention_pairs = self.flops = self.total_flops = 0.0
        self.peak_kv_gb: float | None = None
        self.repeat_seconds: list[float] = []  # per extra timing repeat, its total over batches
        self.compile_seconds = 0.0
        self.recompiles = 0
        self.padded_token_layers = 0.0

    def add_batch(self, out: GenerationOutput, useful: list[int], warmup: bool = False,
                  mask_token_id: int | None = None, repeat_seconds: list[float] = ()) -> list[SampleStats]:
        """Per-row stats of one batch; counted in the totals unless ``warmup``. ``repeat_seconds``:
        the times of the batch's further timing repeats (same tokens)."""
        rows, gen_length = out.tokens.shape
        if len(useful) != rows:
            raise ValueError(f"{len(useful)} useful lengths for a batch of {rows} rows")
        if any(not 0 <= n <= gen_length for n in useful):
            raise ValueError(f"useful lengths {useful} outside [0, {gen_length}]")
        masks = (out.tokens == mask_token_id).sum(1).tolist() if mask_token_id is not None else [0] * rows
        generated = out.generated or [gen_length] * rows  # fewer where stop_at_eos filled the tail
        remasked = out.remasked or [0] * rows
        stats = [SampleStats(int(n), int(g), out.seconds, int(m), int(r))
                 for n, g, m, r in zip(useful, generated, masks, remasked)]
        self.compile_seconds += out.compile_seconds  # the warm-up's too: it compiles the most
        self.recompiles += out.recompiles
        if warmup:
            return stats
        if not self.samples:
            self.repeat_seconds = [0.0] * len(repeat_seconds)
        elif len(repeat_seconds) != len(self.repeat_seconds):
            raise ValueError(f"{len(repeat_seconds)} further timing repeats for a batch, {len(self.repeat_seconds)} before")
        self.repeat_seconds = [total + t for total, t in zip(self.repeat_seconds, repeat_seconds)]
        self.samples.extend(stats)
        self.gen_seconds += out.seconds
        self.nfe += out.nfe
        self.row_forwards += out.nfe * rows
        self.active_token_layers += out.active_token_layers
        self.total_token_layers += out.total_token_layers
        self.padded_token_layers += out.padded_token_layers
        self.peak_mem_gb = out.peak_mem_gb if self.peak_mem_gb is None else max(self.peak_mem_gb, out.peak_mem_gb)
        self.attention_pairs += out.attention_pairs
        self.total_attention_pairs += out.total_attention_pairs
        self.flops += out.flops
        self.total_flops += out.total_flops
        self.peak_kv_gb = out.peak_kv_gb if self.peak_kv_gb is None else max(self.peak_kv_gb, out.peak_kv_gb)
        return stats

    @classmethod
    def merge(cls, meters: list["ThroughputMeter"]) -> "ThroughputMeter":
        """One meter for meters that ran at the same time (data-parallel ranks): counts, work and
        samples summed, maxima kept, and the wall times (``gen_seconds``, each timing repeat's,
        ``compile_seconds``) the longest one's, since the ranks generate and compile side by side.
        So throughput = total tokens / the longest rank's time."""
        merged = cls()
        for m in meters:
            merged.samples.extend(m.samples)
            merged.nfe += m.nfe
            merged.row_forwards += m.row_forwards
            merged.active_token_layers += m.active_token_layers
            merged.total_token_layers += m.total_token_layers
            merged.padded_token_layers += m.padded_token_layers
            merged.attention_pairs += m.attention_pairs
            merged.total_attention_pairs += m.total_attention_pairs
            merged.flops += m.flops
            merged.total_flops += m.total_flops
            merged.peak_mem_gb = _max_or_none(merged.peak_mem_gb, m.peak_mem_gb)
            merged.peak_kv_gb = _max_or_none(merged.peak_kv_gb, m.peak_kv_gb)
            merged.compile_seconds = max(merged.compile_seconds, m.compile_seconds)
            merged.recompiles = max(merged.recompiles, m.recompiles)
        merged.gen_seconds = max((m.gen_seconds for m in meters), default=0.0)
        merged.repeat_seconds = [max(totals) for totals in zip(*(m.repeat_seconds for m in meters))]
        return merged

    def summary(self) -> dict:
        useful = sum(s.useful_tokens for s in self.samples)
        every = sum(s.all_tokens for s in self.samples)
        latencies = [s.seconds for s in self.samples]
        totals = [self.gen_seconds, *self.repeat_seconds]
        seconds = sum(totals) / len(totals)
        timed = seconds > 0 and all(t > 0 for t in totals)
        ratio = self.active_token_layers / self.total_token_layers if self.total_token_layers else None
        return {
            "n_samples": len(self.samples),
            "useful_tokens": useful,
            "all_tokens": every,
            "gen_seconds": seconds,
            "throughput_useful_tok_s": useful / seconds if timed else None,
            "throughput_all_tok_s": every / seconds if timed else None,
            "timing_repeats": len(totals),
            "throughput_useful_tok_s_std": _std([useful / t for t in totals]) if timed else None,
            "throughput_all_tok_s_std": _std([every / t for t in totals]) if timed else None,
            "latency_s_mean": sum(latencies) / len(latencies) if latencies else None,
            "latency_s_p50": percentile(latencies, 50) if latencies else None,
            "latency_s_p90": percentile(latencies, 90) if latencies else None,
            "nfe": self.nfe,
            "tokens_per_forward": every / self.row_forwards if self.row_forwards else None,
            "recompute_ratio": ratio,
            "ideal_speedup": 1 / ratio if ratio else None,
            "attention_ratio": self.attention_pairs / self.total_attention_pairs if self.total_attention_pairs else None,
            "ideal_speedup_attention": self.total_flops / self.flops if self.flops else None,
            "peak_kv_gb": self.peak_kv_gb,
            "peak_mem_gb": self.peak_mem_gb,
            "mask_tokens_left": sum(s.mask_tokens for s in self.samples),
            "remasked_tokens": sum(s.remasked_tokens for s in self.samples),
            "compile_seconds": self.compile_seconds,
            "recompiles": self.recompiles,
            "padding_ratio": self.padded_token_layers / self.total_token_layers if self.total_token_layers else None,
        }


def _max_or_none(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)
