"""decoding=entropy_threshold (dParallel / d3LLM): the rule on hand-made logits, whole generations
against a re-statement of the authors' loop, refusals."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import generate

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EOS_ID, MASK_ID, PAD_ID, random_prompts, tiny_args, tiny_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p + 1e-12)).sum(-1)


def test_commits_every_low_entropy_token_and_at_least_the_lowest():
    dec = build_decoder("entropy_threshold", block_length=4, threshold=0.5)
    P, G, V = 1, 8, 64
    dec.start(DecodeContext(1, P, G, MASK_ID, torch.ones(1, P + G, dtype=torch.bool), None, torch.device("cpu")))
    masked = torch.zeros(1, P + G, dtype=torch.bool)
    masked[0, P:] = True
    plan = dec.plan(0, masked)
    sharpness = torch.tensor([6.0, 1.0, 4.0, 12.0])  # peaked logits: low entropy; flat: high
    logits = torch.randn(1, 4, V, generator=torch.Generator().manual_seed(0)) * sharpness[None, :, None]
    positions = torch.arange(P, P + 4)[None]
    _, confidence = dec.propose(logits, positions)
    fresh = torch.full((1, P + G), float("nan"), dtype=torch.float64)
    fresh[0, P : P + 4] = confidence[0]
    h = entropy(logits)[0]
    chosen = dec.select(dec.priority(fresh, masked).nan_to_num(float("-inf")), plan)[0, P : P + 4]
    assert chosen.tolist() == (h <= 0.5).tolist() and chosen.any()
    strict = build_decoder("entropy_threshold", block_length=4, threshold=0.0)
    strict.start(dec.ctx)
    strict.propose(logits, positions)
    picked = strict.select(strict.priority(fresh, masked).nan_to_num(float("-inf")), strict.plan(0, masked))[0]
    assert picked.nonzero().flatten().tolist() == [P + int(h.argmin())]


def authors_generate(net, prompt: list[int], gen_length: int, block_length: int, threshold: float) -> tuple[list[int], int]:
    """dParallel's ``generate`` with ``threshold`` (LLaDA/generate.py), batch 1, [MASK] never chosen."""
    x = torch.tensor([prompt + [MASK_ID] * gen_length])
    P, nfe = len(prompt), 0
    for block in range(gen_length // block_length):
        hi = P + (block + 1) * block_length
        while True:
            nfe += 1
            mask = x == MASK_ID
            mask[:, hi:] = False
            logits = net(x)[0]
            choice = logits.clone()
            choice[:, MASK_ID] = float("-inf")
            x0 = choice.argmax(-1)
            h = torch.where(mask[0], entropy(logits), torch.tensor(float("inf"), dtype=torch.float64))
            order = h.argsort()
            take = torch.zeros_like(mask[0])
            n = int(mask.sum())
            take[order[:n]] = True
            for k in range(1, n):
                if h[order[k]] > threshold:
                    take[order[k]] = False
            x[0, take] = x0[take]
            if not (x[0, P:hi] == MASK_ID).any():
                break
    return x[0, P:].tolist(), nfe


@pytest.mark.parametrize("threshold", [0.5, 2.0])
def test_generation_equals_the_authors_loop(threshold):
    net = tiny_net(tiny_args("llada", max_seq_len=64), seed=4, logit_scale=3.0, silent_ids=(MASK_ID, PAD_ID, EOS_ID))
    prompts = random_prompts([6, 3, 9], seed=8)
    for prompt in prompts:
        expected, nfe = authors_generate(net, prompt, 16, 8, threshold)
        out = generate(net, [prompt], build_decoder("entropy_threshold", block_length=8, threshold=threshold),
                       build_cache("none"), 16)
        assert out.tokens[0].tolist() == expected and out.nfe == nfe
    batch = generate(net, prompts, build_decoder("entropy_threshold", block_length=8, threshold=threshold),
                     build_cache("none"), 16)
    for row, prompt in enumerate(prompts):
        assert batch.tokens[row].tolist() == authors_generate(net, prompt, 16, 8, threshold)[0]


@pytest.mark.parametrize("params, needle", [
    (dict(threshold=-0.1), "decoding.threshold=-0.1 must be a number >= 0"),
    (dict(threshold="low"), "decoding.threshold='low'"),
    (dict(block_length=0), "decoding.block_length=0 must be an integer >= 1"),
    (dict(steps=0), "decoding.steps=0 must be an integer >= 1 or null"),
])
def test_bad_hyperparameters(params, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        build_decoder("entropy_threshold", **params)
