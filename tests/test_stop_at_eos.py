"""decoding.stop_at_eos: a row stops once decoded up to its first EOS (for block decoders, to the end
of that block); the rest is EOS-filled and not counted as generated; off by default."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose
from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.layout import Layout
from dllm.decoding.loop import generate, stop_rows
from dllm.eval.arith_data import load_test, prompt_text
from dllm.models.loading import load_model
from dllm.models.tokenization import encode_prompts, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
M, E = 9, 7  # mask and eos ids of the hand-made rows


def test_stop_rows_hand_made():
    P = 2
    x = torch.tensor([
        [1, 1, 5, E, M, M, M, M],  # decoded through its EOS: stops (no blocks); with blocks of 4 not yet
        [1, 1, 5, M, E, M, M, M],  # a mask before the EOS: goes on
        [1, 1, 5, 6, 6, 6, 6, 6],  # no EOS: goes on
        [1, 1, E, 5, 6, 6, M, M],  # EOS in the first block of 4, that block complete: stops either way
    ])
    layout = Layout(x, torch.ones_like(x, dtype=torch.bool), P, torch.full((4,), P), 6)
    assert stop_rows(x, layout, E, M, None).tolist() == [True, False, False, True]
    assert stop_rows(x, layout, E, M, 4).tolist() == [False, False, False, True]


def test_stop_rows_block_diffusion_layout():
    """Blocks of 4 from the region start S=4; rows' responses start inside the first block."""
    x = torch.tensor([
        [1, 1, 1, 1, 1, 5, E, M, M, M, M, M],  # response from column 5, EOS at 6, its block [4, 8) not done
        [1, 1, 1, 1, 1, 1, 1, E, M, M, M, M],  # response from column 7: EOS at 7 closes its block: stops
        [0, 0, 0, 0, 1, E, 6, 6, 6, M, M, M],  # EOS at 5 in block [4, 8), complete: stops
    ])
    layout = Layout(x, x != 0, 4, torch.tensor([5, 7, 5]), 5)
    assert stop_rows(x, layout, E, M, 4).tolist() == [False, True, True]
    assert stop_rows(x, layout, E, M, None).tolist() == [True, True, True]


@pytest.fixture(scope="module")
def tiny_llada():
    tokenizer = load_tokenizer(ASSETS / "tiny_llada")
    prompts = encode_prompts(tokenizer, [prompt_text(d["question"]) for d in load_test()[:4]], chat=True)
    return load_model(ASSETS / "tiny_llada"), prompts


BLOCKS = [("low_confidence", dict(steps=64, block_length=16)), ("threshold", dict(block_length=16))]
WHOLE = [("certainty_prior", dict(steps=64))]


@pytest.mark.parametrize("cache, decoding, params", [(c, *d) for c in ("none", "dkv_decode", "dual") for d in BLOCKS]
                         + [(c, *d) for c in ("none", "dkv_decode") for d in WHOLE])
def test_same_answer_fewer_forwards(tiny_llada, cache, decoding, params):
    net, prompts = tiny_llada
    eos = net.args.eos_token_id
    full = generate(net, prompts, build_decoder(decoding, **params), build_cache(cache), 64)
    short = generate(net, prompts, build_decoder(decoding, **params), build_cache(cache), 64, stop_at_eos=True)
    assert short.nfe <= full.nfe
    stopped_early = 0
    for row, (a, b) in enumerate(zip(full.tokens.tolist(), short.tokens.tolist())):
        first = a.index(eos) if eos in a else len(a)
        assert b[: first + 1] == a[: first + 1], row  # the answer up to its EOS is the same
        if eos in b:
            assert set(b[b.index(eos):]) == {eos} or short.generated[row] == 64  # the filled tail
        stopped_early += short.generated[row] < 64
    assert sum(short.generated) < 4 * 64 and stopped_early >= 1  # the trained model ends its answers early
    assert full.generated == [64] * 4


def test_plan_carries_it_and_refuses_non_bools():
    from dllm.pipeline import plan_run

    assert plan_run(compose()).stop_at_eos is False
    assert plan_run(compose("decoding.stop_at_eos=true")).stop_at_eos is True
    with pytest.raises(ValueError, match="decoding.stop_at_eos='maybe' must be true or false"):
        plan_run(compose("decoding.stop_at_eos=maybe"))
