"""WINO (decoding=wino): its wide-in / narrow-out rules on hand-made scores, the verification
pass against the authors' one-forward shadow block, whole generations against a re-statement of
the authors' loop, and the loop's re-masking rules (refresh, accounting) with cache methods."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dllm.cache.base import ActiveRequest, CacheMethod, StepView, build_cache
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import check_guidance, generate
from dllm.decoding.verify import verification_confidence
from dllm.eval.arith_data import load_test, prompt_text
from dllm.models.loading import load_model
from dllm.models.tokenization import encode_prompts, load_tokenizer
from dllm.models.transformer import KVStore

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EOS_ID, MASK_ID, PAD_ID, Recorder, random_prompts, tiny_args, tiny_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
INF = float("inf")


def started(decoder, batch: int = 1, prompt: int = 2, gen: int = 8):
    real = torch.ones(batch, prompt + gen, dtype=torch.bool)
    decoder.start(DecodeContext(batch, prompt, gen, MASK_ID, real, None, torch.device("cpu")))
    return decoder


# ------------------------------------------------------------------------------ the rules


def test_wide_in_commits_every_token_above_threshold():
    wino = started(build_decoder("wino", block_length=8, threshold=0.6))
    masked = torch.zeros(1, 10, dtype=torch.bool)
    masked[0, 2:] = True
    plan = wino.plan(0, masked)
    assert plan.window == (2, 10) and plan.verify == (2, 10)
    score = torch.full((1, 10), -INF, dtype=torch.float64)
    score[0, 2:] = torch.tensor([0.7, 0.5, 0.61, 0.6, 0.9, 0.1, 0.2, 0.3], dtype=torch.float64)
    assert wino.select(score, plan)[0].nonzero().flatten().tolist() == [2, 4, 6]  # > 0.6, not >=


def test_wide_in_takes_the_single_best_when_none_passes():
    wino = started(build_decoder("wino", block_length=8, threshold=0.95))
    masked = torch.zeros(1, 10, dtype=torch.bool)
    masked[0, 2:] = True
    plan = wino.plan(0, masked)
    score = torch.full((1, 10), -INF, dtype=torch.float64)
    score[0, 2:] = torch.tensor([0.7, 0.5, 0.61, 0.6, 0.9, 0.1, 0.2, 0.3], dtype=torch.float64)
    assert wino.select(score, plan)[0].nonzero().flatten().tolist() == [6]


@pytest.mark.parametrize("masked_count, cap", [(4, 5), (10, 7), (20, 14), (40, 20)])
def test_wide_in_caps_at_max_accept(masked_count, cap):
    """max_accept = min(max(floor(0.7 x masked in block), 5), 20); the most confident are kept."""
    gen = 40
    wino = started(build_decoder("wino", block_length=gen, threshold=0.0), gen=gen)
    masked = torch.zeros(1, 2 + gen, dtype=torch.bool)
    masked[0, 2 : 2 + masked_count] = True
    plan = wino.plan(0, masked)
    score = torch.full((1, 2 + gen), -INF, dtype=torch.float64)
    score[0, 2 : 2 + masked_count] = torch.linspace(0.5, 0.99, masked_count, dtype=torch.float64)
    chosen = wino.select(score, plan)[0].nonzero().flatten().tolist()
    assert chosen == list(range(2 + masked_count - min(cap, masked_count), 2 + masked_count))


def narrow_out(wino, verified: list[float], accepted: int):
    """remask() for one row of 8 response positions after a 2-token prompt."""
    ver = torch.full((1, 10), float("nan"), dtype=torch.float64)
    ver[0, 2:] = torch.tensor(verified, dtype=torch.float64)
    transferred = torch.zeros(1, 10, dtype=torch.bool)
    transferred[0, 2 : 2 + accepted] = True  # (positions whose verified value is NaN in the callers)
    return wino.remask(ver, transferred, None)[0].nonzero().flatten().tolist()


def test_narrow_out_remasks_doubtful_tokens_only_when_several_were_accepted():
    nan = float("nan")
    wino = started(build_decoder("wino", block_length=8, threshold_back=0.9))
    assert narrow_out(wino, [nan, nan, 0.5, 0.95, 0.89, 0.9, nan, 0.2], accepted=2) == [4, 6, 9]
    assert wino.last_accept.tolist() == [2]
    wino.last_accept.fill_(30)
    assert narrow_out(wino, [nan, 0.5, 0.1, 0.2, nan, nan, nan, nan], accepted=1) == []  # one accepted: none


def test_narrow_out_keeps_fewer_than_last_accept():
    """With at least last_accept doubtful tokens, only the last_accept - 1 least confident go."""
    nan = float("nan")
    wino = started(build_decoder("wino", block_length=8, threshold_back=0.9))
    assert narrow_out(wino, [nan, nan, nan, 0.5, 0.1, 0.3, 0.4, 0.2], accepted=3) == [5, 6, 7, 8, 9]  # 5 < 30 doubtful: all
    wino.last_accept.fill_(30)
    assert narrow_out(wino, [nan, nan, 0.5, 0.1, 0.3, 0.4, 0.2, 0.8], accepted=2) == [4, 5, 6, 7, 8, 9]
    # last_accept is now 2: of the 4 doubtful ones, only 2 - 1 = 1, the least confident
    assert narrow_out(wino, [nan, nan, nan, 0.1, 0.3, 0.4, 0.2, 0.95], accepted=4) == [5]
    assert wino.last_accept.tolist() == [4]


def test_last_accept_restarts_at_each_block():
    wino = started(build_decoder("wino", block_length=4, threshold_back=0.9))
    masked = torch.zeros(1, 10, dtype=torch.bool)
    masked[0, 2:] = True
    wino.plan(0, masked)
    wino.last_accept.fill_(2)
    masked[0, 2:6] = False
    wino.plan(1, masked)  # the second block starts
    assert wino.last_accept.tolist() == [30]


# -------------------------------------------------------------------------- the shadow block


def authors_augmented_forward(net, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Probabilities (T + S, V) of one forward over [sequence | shadow block of [MASK]] with the
    authors' attention mask and position ids (batch 1, no padding)."""
    T, S = x.shape[1], hi - lo
    tokens = torch.cat([x, torch.full((1, S), MASK_ID)], 1)
    positions = torch.cat([torch.arange(T), torch.arange(lo, hi)])[None]
    allowed = torch.ones(T + S, T + S, dtype=torch.bool)
    allowed[:, T:] = False
    allowed[T:, T:] = True
    allowed[T:, lo:hi] = ~torch.eye(S, dtype=torch.bool)
    hidden, _ = net.hidden(tokens, positions, allowed[None, None])
    return torch.softmax(net.output(hidden)[0].double(), -1)


@pytest.fixture
def net():
    # Unsure, peaked-enough predictions: both commits and verification failures happen.
    return tiny_net(tiny_args("llada", max_seq_len=64), seed=5, logit_scale=2.5, silent_ids=(MASK_ID, PAD_ID, EOS_ID))


def test_verification_matches_the_authors_shadow_block(net):
    prompt = random_prompts([6], seed=2)[0]
    x = torch.tensor([prompt + random_prompts([12], seed=4)[0]])
    x[0, [7, 9, 12, 15]] = MASK_ID  # some positions still masked
    T, lo, hi = x.shape[1], 8, 16
    store = KVStore(net.args, 1, T, torch.device("cpu"), net.dtype)
    x_trash = torch.cat([x, torch.tensor([[MASK_ID]])], 1)
    positions = torch.cat([torch.arange(T), torch.zeros(1, dtype=torch.long)])[None]
    key_mask = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])[None, None, None]
    net.hidden(x_trash[:, :T], positions[:, :T], key_mask, store, None)  # the step's full forward
    ours = verification_confidence(net, x_trash, positions, key_mask, store, (lo, hi))

    probs = authors_augmented_forward(net, x, lo, hi)
    expected = torch.full((T,), float("nan"), dtype=torch.float64)
    for j in range(lo, hi):
        if x[0, j] != MASK_ID:
            expected[j] = probs[T + j - lo, x[0, j]]
    assert torch.allclose(ours[0], expected, atol=1e-6, equal_nan=True)
    assert ours[0, :lo].isnan().all() and ours[0, 12].isnan()


# -------------------------------------------------------------- whole generations vs the authors


def authors_wino(net, prompt: list[int], gen_length: int, block_length: int, threshold: float, threshold_back: float):
    """The authors' decoding_wino (Feng-Hong/WINO-DLLM, LLaDA/decoding.py), re-stated for one
    prompt: one forward per step over [sequence | shadow block]; [MASK] never chosen (as here)."""
    P = len(prompt)
    T = P + gen_length
    x = torch.full((1, T), MASK_ID)
    x[0, :P] = torch.tensor(prompt)
    steps = 0
    for block in range(gen_length // block_length):
        lo, hi = P + block * block_length, P + (block + 1) * block_length
        masked = torch.zeros(T, dtype=torch.bool)
        masked[lo:hi] = x[0, lo:hi] == MASK_ID
        committed = ~masked[lo:hi]  # per shadow position
        last_accept = 30
        while masked.any():
            max_accept = min(max(int(int(masked.sum()) * 0.7), 5), 20)
            probs = authors_augmented_forward(net, x, lo, hi)
            logits_choice = probs.clone()
            logits_choice[:, MASK_ID] = -1
            x0 = logits_choice.argmax(-1)
            x0[T:][committed] = x[0, lo:hi][committed]
            x0_p = probs.gather(-1, x0[:, None]).squeeze(-1)
            confidence = torch.where(torch.cat([masked, torch.zeros(hi - lo, dtype=torch.bool)]), x0_p, -INF)
            confidence_back = torch.where(committed, x0_p[T:], INF)
            transfer = confidence > threshold
            if transfer.sum() > max_accept:
                transfer = torch.zeros_like(transfer)
                transfer[confidence.topk(max_accept).indices] = True
            elif not transfer.any():
                transfer[confidence.argmax()] = True
            x[0, transfer[:T]] = x0[:T][transfer[:T]]
            accepted = int(transfer.sum())
            remask = torch.zeros(hi - lo, dtype=torch.bool)
            if accepted > 1:
                remask = confidence_back < threshold_back
                if remask.sum() >= last_accept:
                    remask = torch.zeros_like(remask)
                    remask[confidence_back.topk(last_accept - 1, largest=False).indices] = True
            x[0, lo:hi][remask] = MASK_ID
            masked[transfer[:T]] = False
            masked[lo:hi] |= remask
            committed |= transfer[lo:hi]
            committed &= ~remask
            last_accept = accepted
            steps += 1
    return x[0, P:], steps


@pytest.mark.parametrize("gen_length, block_length, threshold", [(16, 16, 0.6), (24, 8, 0.3), (16, 8, 0.05)])
def test_generation_equals_the_authors_loop(net, gen_length, block_length, threshold):
    prompts = random_prompts([6, 3, 9], seed=7)
    total_remasked = 0
    for prompt in prompts:
        expected, steps = authors_wino(net, prompt, gen_length, block_length, threshold, 0.9)
        out = generate(net, [prompt], build_decoder("wino", block_length=block_length, threshold=threshold),
                       build_cache("none"), gen_length)
        assert out.tokens[0].tolist() == expected.tolist()
        assert out.nfe == steps
        total_remasked += out.remasked[0]
    assert total_remasked > 0  # the narrow-out rule was exercised
    # Batched (left-padded): every row as when alone; the block waits for the slowest row.
    batch = generate(net, prompts, build_decoder("wino", block_length=block_length, threshold=threshold),
                     build_cache("none"), gen_length)
    for row, prompt in enumerate(prompts):
        assert batch.tokens[row].tolist() == authors_wino(net, prompt, gen_length, block_length, threshold, 0.9)[0].tolist()


def test_trained_tiny_llada_remasks_and_accounts(one_thread):
    folder = ASSETS / "tiny_llada"
    tokenizer = load_tokenizer(folder)
    prompts = encode_prompts(tokenizer, [prompt_text(d["question"]) for d in load_test()[:4]], chat=True)
    net = load_model(folder)
    out = generate(net, prompts, build_decoder("wino", block_length=32, threshold=0.3), build_cache("none"), 64)
    assert not (out.tokens == net.args.mask_token_id).any()
    assert len(out.remasked) == 4
    T = len(max(prompts, key=len)) + 64
    # cache=none: every forward computes the T positions and the 32 shadow rows of each row
    assert out.total_token_layers == out.nfe * 4 * (T + 32) * net.args.n_layers == out.active_token_layers


# ---------------------------------------------------------------- the loop's re-masking rules


class MaskedOnlyOnce(CacheMethod):
    """Recomputes the masked positions of the window, but not those re-masked in the last step:
    only the loop's rule can make those fresh."""

    name = "masked_only_once"

    def start(self, ctx) -> None:
        super().start(ctx)
        self.remasked = torch.zeros(ctx.batch, ctx.length, dtype=torch.bool)

    def select(self, view: StepView) -> ActiveRequest:
        lo, hi = view.plan.window
        window = torch.zeros_like(view.masked)
        window[:, lo:hi] = True
        wanted = view.masked & window & ~self.remasked
        return ActiveRequest(predict=wanted, refresh=wanted)

    def observe(self, view, outcome) -> None:
        self.remasked = outcome.remasked.clone()


def test_remasked_positions_are_recomputed_in_the_next_forward(net):
    cache = Recorder(MaskedOnlyOnce())
    out = generate(net, random_prompts([6, 3], seed=7), build_decoder("wino", block_length=8, threshold=0.05),
                   cache, 16, record_trace=True)
    assert not (out.tokens == MASK_ID).any()
    remask_steps = [i for i, s in enumerate(cache.steps) if s["remasked"].any()]
    assert remask_steps and remask_steps[-1] + 1 < len(cache.steps)
    for i in remask_steps:
        remasked = cache.steps[i]["remasked"]
        assert (out.trace[i + 1][remasked]).all()  # made fresh though the method did not ask
        assert (cache.steps[i + 1]["masked"][remasked]).all()  # and masked for the decoder
    assert sum(out.remasked) == sum(int(s["remasked"].sum()) for s in cache.steps)


EXACT = [("dkv_decode", dict(refresh_interval=1)), ("d2cache", dict(refresh_interval=1, k=4, p=0.1, sigma=10.0))]


@pytest.mark.parametrize("method, params", EXACT, ids=[m for m, _ in EXACT])
def test_caches_at_refresh_one_reproduce_none(net, method, params):
    prompts = random_prompts([6, 3, 9], seed=7)
    decoder = dict(block_length=8, threshold=0.05)
    ref = generate(net, prompts, build_decoder("wino", **decoder), build_cache("none"), 16)
    out = generate(net, prompts, build_decoder("wino", **decoder), build_cache(method, **params), 16)
    assert sum(ref.remasked) > 0
    assert torch.equal(out.tokens, ref.tokens) and out.remasked == ref.remasked


@pytest.mark.parametrize("cache", ["prefix", "dual", "dllm_cache", "dkv_decode", "d2cache"])
def test_cached_wino_completes(net, cache):
    out = generate(net, random_prompts([6, 3, 9], seed=7), build_decoder("wino", block_length=8, threshold=0.05),
                   build_cache(cache), 16)
    assert not (out.tokens == MASK_ID).any() and out.recompute_ratio < 1


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("params, needle", [
    (dict(threshold=1.5), "decoding.threshold=1.5 must be a number in [0, 1]"),
    (dict(threshold_back=-0.1), "decoding.threshold_back=-0.1 must be a number in [0, 1]"),
    (dict(threshold="high"), "decoding.threshold='high'"),
    (dict(block_length=0), "decoding.block_length=0 must be an integer >= 1"),
    (dict(temperature=-1.0), "decoding.temperature=-1.0 must be a number >= 0"),
    (dict(steps=0), "decoding.steps=0 must be an integer >= 1 or null"),
])
def test_bad_hyperparameters(params, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_decoder("wino", **params)


def test_dream_and_guidance_are_refused():
    wino = build_decoder("wino")
    with pytest.raises(ValueError, match="LLaDA family"):
        wino.check_model(1)
    wino.check_model(0)
    with pytest.raises(ValueError, match="re-masks tokens"):
        check_guidance(1.5, build_cache("none"), wino)
