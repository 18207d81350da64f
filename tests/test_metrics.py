"""Token, time and compute accounting on hand-counted cases (dllm.metrics.accounting)."""
from __future__ import annotations

import pytest
import torch

from dllm.decoding.loop import GenerationOutput
from dllm.metrics.accounting import SampleStats, ThroughputMeter, percentile
from dllm.models.tokenization import useful_lengths

from conftest import EOS_ID, PAD_ID

EOT_ID = 60  # a second stop id (end of turn), as instruct models have
STOPS = {EOS_ID, EOT_ID}
G = 6

# Hand-counted rows (response part only): useful = up to and including the first stop token.
ROWS = [
    ([5, 7, EOS_ID, EOS_ID, EOS_ID, EOS_ID], 3),  # LLaDA-style EOS fill after the answer
    ([5, 7, 8, 9, 10, 11], 6),  # no stop: every token counts
    ([EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID], 1),  # empty answer: the EOS alone
    ([1, EOT_ID, 3, EOS_ID, 5, 6], 2),  # the first stop of any kind ends it
]


def output(rows: list[list[int]], seconds: float = 1.0, nfe: int = G, active_per_row: int | None = None,
           seq_len: int = 10, layers: int = 2, peak: float = 0.5) -> GenerationOutput:
    """A GenerationOutput as the loop returns it: (B, G) response tokens, full-forward totals."""
    B = len(rows)
    total = nfe * B * seq_len * layers
    active = total if active_per_row is None else active_per_row * B
    return GenerationOutput(torch.tensor(rows), nfe, active, total, seconds, peak)


def test_useful_lengths_hand_counted():
    tokens = torch.tensor([r for r, _ in ROWS])
    assert useful_lengths(tokens, STOPS) == [n for _, n in ROWS]


def test_batch_one_and_four_give_the_same_totals():
    rows = [r for r, _ in ROWS]
    batched, single = ThroughputMeter(), ThroughputMeter()
    out = output(rows, seconds=2.0)
    stats = batched.add_batch(out, useful_lengths(out.tokens, STOPS))
    assert stats == [SampleStats(n, G, 2.0) for _, n in ROWS]
    for row in rows:
        out = output([row], seconds=0.5)
        single.add_batch(out, useful_lengths(out.tokens, STOPS))
    a, b = batched.summary(), single.summary()
    for key in ("n_samples", "useful_tokens", "all_tokens", "gen_seconds", "tokens_per_forward", "recompute_ratio"):
        assert a[key] == b[key], key
    assert a["useful_tokens"] == 3 + 6 + 1 + 2 and a["all_tokens"] == 4 * G
    assert a["nfe"] == G and b["nfe"] == 4 * G  # batched forwards advance all rows at once
    assert a["tokens_per_forward"] == 1.0  # one token per step per row, whatever the batch size


def test_prompt_padding_is_not_counted(make_args, make_net):
    """A real left-padded batch: tokens hold only the response, so padding never counts."""
    from dllm.cache.base import build_cache
    from dllm.decoding.base import build_decoder
    from dllm.decoding.loop import generate

    net = make_net(make_args("llada"))
    prompts = [[1, 2], [3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [13]]
    decoder = build_decoder("low_confidence", steps=4, block_length=8)
    out = generate(net, prompts, decoder, build_cache("none"), gen_length=8)
    assert out.tokens.shape == (4, 8)
    meter = ThroughputMeter()
    meter.add_batch(out, useful_lengths(out.tokens, {EOS_ID}))
    summary = meter.summary()
    assert summary["all_tokens"] == 4 * 8
    assert summary["useful_tokens"] == sum(useful_lengths(out.tokens, {EOS_ID})) <= 4 * 8
    assert summary["tokens_per_forward"] == 8 / 4  # 8 tokens in 4 steps: 2 per forward
    assert summary["recompute_ratio"] == 1.0 and summary["ideal_speedup"] == 1.0  # no cache


def test_throughput_is_total_tokens_over_total_time():
    meter = ThroughputMeter()
    meter.add_batch(output([ROWS[1][0]], seconds=1.0), [6])
    meter.add_batch(output([ROWS[2][0]], seconds=4.0), [1])
    summary = meter.summary()
    assert summary["gen_seconds"] == 5.0
    assert summary["throughput_useful_tok_s"] == pytest.approx(7 / 5)  # the mean of ratios: 3.125
    assert summary["throughput_all_tok_s"] == pytest.approx(12 / 5)


def test_latency_is_per_sample_batch_time():
    meter = ThroughputMeter()
    row = ROWS[1][0]
    for seconds, size in [(1.0, 2), (3.0, 1), (10.0, 1), (20.0, 1)]:
        meter.add_batch(output([row] * size, seconds=seconds), [6] * size)
    summary = meter.summary()
    # per-sample latencies [1, 1, 3, 10, 20]; the 2-row batch counts once in gen_seconds
    assert summary["n_samples"] == 5 and summary["gen_seconds"] == 34.0
    assert summary["latency_s_mean"] == pytest.approx(35 / 5)
    assert summary["latency_s_p50"] == 3.0
    assert summary["latency_s_p90"] == pytest.approx(10 + 0.6 * (20 - 10))  # rank 3.6, linear


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 2.5, 1.0, 7.0, 4.2, 4.2, 9.9]
    for q in (0, 10, 50, 90, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_warmup_batch_is_excluded():
    meter = ThroughputMeter()
    warm = meter.add_batch(output([ROWS[0][0]], seconds=30.0, nfe=99, peak=80.0), [3], warmup=True)
    assert warm == [SampleStats(3, G, 30.0)]  # the caller still gets its stats
    assert meter.summary()["n_samples"] == 0
    meter.add_batch(output([ROWS[1][0]], seconds=2.0, peak=1.5), [6])
    summary = meter.summary()
    assert summary["n_samples"] == 1 and summary["useful_tokens"] == 6 and summary["gen_seconds"] == 2.0
    assert summary["nfe"] == G and summary["peak_mem_gb"] == 1.5 and summary["latency_s_p90"] == 2.0


def test_recompute_ratio_is_a_ratio_of_sums():
    meter = ThroughputMeter()
    row = ROWS[1][0]
    first = output([row], active_per_row=24, peak=2.0)  # 24 / 120 = 0.2
    second = output([row] * 3, active_per_row=90, peak=1.0)  # 270 / 360 = 0.75
    meter.add_batch(first, [6])
    meter.add_batch(second, [6] * 3)
    summary = meter.summary()
    assert summary["recompute_ratio"] == pytest.approx((24 + 270) / (120 + 360))  # mean of ratios: 0.475
    assert summary["ideal_speedup"] == pytest.approx((120 + 360) / (24 + 270))
    assert summary["peak_mem_gb"] == 2.0


def test_empty_meter_and_bad_input():
    summary = ThroughputMeter().summary()
    assert summary["n_samples"] == 0 and summary["useful_tokens"] == 0 and summary["nfe"] == 0
    for key in ("throughput_useful_tok_s", "latency_s_p50", "tokens_per_forward", "recompute_ratio", "peak_mem_gb"):
        assert summary[key] is None
    meter = ThroughputMeter()
    with pytest.raises(ValueError, match="2 useful lengths for a batch of 1"):
        meter.add_batch(output([ROWS[0][0]]), [3, 3])
    with pytest.raises(ValueError, match="outside"):
        meter.add_batch(output([ROWS[0][0]]), [G + 1])


def test_summary_keys_are_run_record_fields():
    from dataclasses import fields

    from dllm.logging.record import RunRecord

    assert set(ThroughputMeter().summary()) <= {f.name for f in fields(RunRecord)}


def test_mask_tokens_left_are_counted_per_sample_and_run():
    """A [MASK] left in a response would vanish from the decoded text (a special token): the
    record counts them (0 in every valid run; the loop refuses to return any)."""
    from conftest import MASK_ID

    meter = ThroughputMeter()
    out = output([[5, MASK_ID, 7, MASK_ID, EOS_ID, EOS_ID], [5, 7, 8, 9, 10, EOS_ID]])
    stats = meter.add_batch(out, useful_lengths(out.tokens, STOPS), mask_token_id=MASK_ID)
    assert [s.mask_tokens for s in stats] == [2, 0]
    meter.add_batch(output([[MASK_ID] * G]), [G], warmup=True, mask_token_id=MASK_ID)  # not counted
    assert meter.summary()["mask_tokens_left"] == 2


def test_timing_repeats_give_mean_time_and_throughput_spread():
    """Three timings of each of two batches: totals 3, 4 and 5 s -> mean 4 s; the throughput's
    standard deviation (ddof 1) over the three totals."""
    meter = ThroughputMeter()
    rows = [r for r, _ in ROWS[:2]]  # useful 3 + 6 of all 12 tokens
    meter.add_batch(output(rows, seconds=1.0), [3, 6], repeat_seconds=[1.5, 2.0])
    meter.add_batch(output(rows, seconds=2.0), [3, 6], repeat_seconds=[2.5, 3.0])
    summary = meter.summary()
    assert summary["timing_repeats"] == 3 and summary["gen_seconds"] == pytest.approx(4.0)
    assert summary["throughput_all_tok_s"] == pytest.approx(24 / 4.0)
    rates = [24 / 3, 24 / 4, 24 / 5]
    mean = sum(rates) / 3
    assert summary["throughput_all_tok_s_std"] == pytest.approx((sum((r - mean) ** 2 for r in rates) / 2) ** 0.5)
    assert summary["latency_s_mean"] == pytest.approx(1.5)  # the first timing of each batch
    with pytest.raises(ValueError, match="timing repeats"):
        meter.add_batch(output(rows), [3, 6], repeat_seconds=[1.0])
    single = ThroughputMeter()
    single.add_batch(output(rows), [3, 6])
    assert single.summary()["timing_repeats"] == 1 and single.summary()["throughput_all_tok_s_std"] is None


def test_positions_filled_after_an_early_stop_are_not_generated():
    out = output([r for r, _ in ROWS[:2]])
    out.generated = [3, G]  # row 0 stopped at its EOS (stop_at_eos), row 1 ran to the end
    meter = ThroughputMeter()
    meter.add_batch(out, [3, 6])
    summary = meter.summary()
    assert summary["all_tokens"] == 3 + G and summary["useful_tokens"] == 3 + 6


def test_compile_time_counts_the_warm_up_and_padding_is_apart():
    """Compiled layers: compile time and graphs count every batch, the warm-up included (where most
    compiling happens; never in gen_seconds); bucket padding is its own ratio of full-forward rows."""
    meter = ThroughputMeter()
    rows = [r for r, _ in ROWS[:2]]
    warm = output(rows, seconds=1.0)
    warm.compile_seconds, warm.recompiles, warm.padded_token_layers = 30.0, 3, 999.0
    meter.add_batch(warm, [3, 6], warmup=True)
    counted = output(rows, seconds=2.0, active_per_row=40)  # total: G x 2 rows x 10 x 2 layers = 240
    counted.compile_seconds, counted.recompiles, counted.padded_token_layers = 5.0, 1, 24.0
    meter.add_batch(counted, [3, 6])
    summary = meter.summary()
    assert summary["compile_seconds"] == 35.0 and summary["recompiles"] == 4
    assert summary["gen_seconds"] == 2.0
    assert summary["recompute_ratio"] == pytest.approx(80 / 240) and summary["padding_ratio"] == pytest.approx(24 / 240)
    eager = ThroughputMeter()
    eager.add_batch(output(rows), [3, 6])
    assert eager.summary()["compile_seconds"] == 0.0 and eager.summary()["padding_ratio"] == 0.0


def test_merged_ranks_equal_one_meter_except_wall_time():
    """Data-parallel ranks' meters merged (ThroughputMeter.merge) give what one meter over all their
    batches gives, for every summary field that is not a wall time: work totals and their ratios
    (recompute, attention, FLOPs, padding), maxima (peak memory, peak K/V) and per-sample stats.
    The wall times are the longest rank's, so throughput = all tokens / that time."""
    def batch(rows: list[list[int]], seconds: float, scale: float) -> GenerationOutput:
        out = output(rows, seconds=seconds, active_per_row=7 * scale, peak=0.5 * scale)
        out.attention_pairs, out.total_attention_pairs = 30.0 * scale, 100.0
        out.flops, out.total_flops = 40.0 * scale, 90.0
        out.peak_kv_gb, out.padded_token_layers = 0.1 * scale, 2.0 * scale
        out.compile_seconds, out.recompiles = 1.5 * scale, int(2 * scale)
        return out

    ranks = [[batch([ROWS[0][0], ROWS[1][0]], 2.0, 1.0)], [batch([ROWS[2][0]], 3.0, 2.0), batch([ROWS[3][0]], 1.0, 3.0)]]
    parts, whole = [], ThroughputMeter()
    for outs in ranks:
        meter = ThroughputMeter()
        for out in outs:
            useful = useful_lengths(out.tokens, STOPS)
            meter.add_batch(out, useful, repeat_seconds=[out.seconds + 1])
            whole.add_batch(out, useful, repeat_seconds=[out.seconds + 1])
        parts.append(meter)
    merged = ThroughputMeter.merge(parts).summary()
    expected = whole.summary()
    wall = {"gen_seconds", "throughput_useful_tok_s", "throughput_all_tok_s", "throughput_useful_tok_s_std",
            "throughput_all_tok_s_std", "compile_seconds", "recompiles"}
    assert set(merged) == set(expected)
    assert {k: v for k, v in merged.items() if k not in wall} == {k: v for k, v in expected.items() if k not in wall}
    assert merged["attention_ratio"] == pytest.approx((30 + 60 + 90) / 300)  # what the old merge dropped (None)
    assert merged["peak_kv_gb"] == pytest.approx(0.3)
    # The longest rank's times: generation 2 s vs 3 + 1 s, the repeat 3 s vs 4 + 2 s; compiling 1.5 s vs 3 + 4.5 s.
    assert merged["gen_seconds"] == pytest.approx((4.0 + 6.0) / 2)
    assert merged["throughput_all_tok_s"] == pytest.approx(4 * G / 5.0)
    assert (merged["compile_seconds"], merged["recompiles"]) == (pytest.approx(7.5), 10)
