"""Golden outputs: every cache method x every decoder it accepts, on fixed tiny random models.

The tokens, forward counts and token-layer totals of each combination were recorded from the
code before a change of the denoising loop or the step protocol; the test keeps them identical,
so that widening the protocol never silently changes an existing method. Combinations whose
output was changed on purpose (a bug fix) are re-recorded in the commit that changes them, and
that commit says why.

Record anew (only with a reason): ``python tests/test_golden.py --record``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EOS_ID, MASK_ID, PAD_ID, random_prompts, tiny_args, tiny_net  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "outputs.json"
GEN_LENGTH = 16
PROMPTS = random_prompts([7, 4, 10], seed=3)  # a left-padded batch of three

DECODERS = {
    "low_confidence": dict(steps=16, block_length=8),
    "low_confidence_2per": dict(name="low_confidence", steps=8, block_length=8),
    "random": dict(steps=16, block_length=8),
    "threshold": dict(block_length=8, threshold=0.3),
    "certainty_prior": dict(steps=16, sigma=3.0),
    "dream_entropy": dict(name="dream", steps=16, alg="entropy"),
    "dream_maskgit_plus": dict(name="dream", steps=8, alg="maskgit_plus"),
    "dream_topk_margin": dict(name="dream", steps=16, alg="topk_margin"),
    "dream_origin": dict(name="dream", steps=16, alg="origin"),
    "dream_blocks": dict(name="dream", steps=16, alg="entropy", block_length=8, first_token="commit"),
    "ar": dict(steps=16, block_length=8),
    "eb_sampler": dict(block_length=8, gamma=0.3),
    "pc_sampler": dict(steps=16, block_length=8),
    "prophet": dict(steps=16, block_length=8),
    "klass": dict(steps=16, block_length=8, conf_threshold=0.5, kl_threshold=0.05),
    "wino": dict(block_length=8, threshold=0.3),
    "entropy_threshold": dict(block_length=8, threshold=1.0),
}
CACHES = {
    "none": dict(),
    "dkv_decode": dict(refresh_interval=4),
    "dkv_decode_pd": dict(name="dkv_decode", refresh_interval=4, variant="pd"),
    "dkv_decode_prefill": dict(name="dkv_decode", refresh_interval=4, variant="prefill"),
    "dkv_greedy": dict(refresh_interval=2, window=2),
    "d2cache": dict(k=2, p=0.3, sigma=3.0),
    "prefix": dict(),
    "dual": dict(),
    "dllm_cache": dict(prompt_interval=5, response_interval=3, update_ratio=0.25),
    "elastic": dict(gamma=0.9, window=3),
    "sparse_dllm": dict(keep_ratio=0.5),
    "streaming": dict(window=4),
    "dpad": dict(window=6),
}


def _build(table: dict, name: str, builder):
    params = dict(table[name])
    return builder(params.pop("name", name), **params)


def _net(family: str, dtype: torch.dtype = torch.float64):
    # Peaked predictions (logit_scale) and silent special tokens, as a trained model would have.
    # In float64: float32 GEMMs round differently on other CPUs (MKL's AVX vs AVX2 paths), and that
    # moved near-ties of dLLM-Cache's value similarities (two combinations changed between machines);
    # in float64 the same outputs hold under MKL_CBWR=AVX|COMPATIBLE and weights perturbed by 1e-7.
    args = tiny_args(family, max_seq_len=64)
    # (tests/test_compile.py takes the same models in float32, the dtype compiled CPU runs prepack.)
    return tiny_net(args, seed=11, logit_scale=4.0, silent_ids=(MASK_ID, PAD_ID, EOS_ID)).to(dtype)


def run_all() -> dict[str, dict]:
    """{family/cache/decoder: {tokens, nfe, active_token_layers}} for every accepted combination."""
    torch.set_num_threads(1)
    results = {}
    for family in ("llada", "dream"):
        net = _net(family)
        for cache_name in CACHES:
            for decoder_name in DECODERS:
                decoder = _build(DECODERS, decoder_name, build_decoder)
                cache = _build(CACHES, cache_name, build_cache)
                try:
                    cache.check(decoder)
                    decoder.check(GEN_LENGTH)
                    decoder.check_model(net.args.logit_shift)
                except ValueError:
                    continue  # refused by name before generating: nothing to keep
                out = generate(net, PROMPTS, decoder, cache, GEN_LENGTH, generator=torch.Generator().manual_seed(5))
                results[f"{family}/{cache_name}/{decoder_name}"] = {
                    "tokens": out.tokens.tolist(),
                    "nfe": out.nfe,
                    "active_token_layers": round(out.active_token_layers, 6),
                    **({"remasked": out.remasked} if decoder.remasks else {}),
                }
    return results


@pytest.fixture(scope="module")
def current() -> dict[str, dict]:
    return run_all()


def test_every_recorded_combination_is_unchanged(current):
    golden = json.loads(GOLDEN.read_text())
    assert sorted(current) == sorted(golden), "the set of accepted (cache, decoder) combinations changed"
    changed = [key for key in golden if current[key] != golden[key]]
    assert not changed, f"outputs changed for {changed}"


def test_golden_cover_every_method_and_decoder():
    golden = json.loads(GOLDEN.read_text())
    methods = {key.split("/")[1] for key in golden}
    decoders = {key.split("/")[2] for key in golden}
    assert methods == set(CACHES) and decoders == set(DECODERS)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(run_all(), indent=0, sort_keys=True) + "\n")
    print(f"recorded -> {GOLDEN}")
