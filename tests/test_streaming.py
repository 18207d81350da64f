"""cache=streaming: Streaming-dLLM's suffix pruning (window + tail) on Fast-dLLM's block caches."""
from __future__ import annotations

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.cache.streaming import kept_suffix
from dllm.decoding.base import build_decoder
from dllm.decoding.loop import generate
from dllm.models.transformer import KVStore

from conftest import MASK_ID, Recorder, random_prompts, tiny_args, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

GEN, BLOCK = 24, 8


def low_confidence():
    return build_decoder("low_confidence", steps=GEN, block_length=BLOCK)


def threshold():
    return build_decoder("threshold", block_length=BLOCK, threshold=0.3)


DECODERS = {"low_confidence": low_confidence, "threshold": threshold}


def peaked(family: str):
    return tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))


@pytest.mark.parametrize("hi,window,tail,kept", [
    (14, 5, True, [14, 15, 16, 17, 18, 29]),  # 16 suffix positions: the 5 nearest and the last
    (22, 5, True, [22, 23, 24, 25, 26, 29]),
    (14, 5, False, [14, 15, 16, 17, 18]),
    (14, 0, True, [29]),                      # window 0: only the final position
    (14, 0, False, []),                       # no suffix at all
    (22, 8, True, list(range(22, 30))),       # the suffix fits the window: kept whole, no tail added
    (14, None, True, list(range(14, 30))),    # pruning off
    (30, 5, True, []),                        # the last block has no suffix
])
def test_kept_suffix_hand_cases(hi, window, tail, kept):
    assert kept_suffix(30, hi, window, tail) == kept


@pytest.mark.parametrize("base", ["prefix", "dual"])
def test_keys_and_rows_hand_traced(family, base):
    """Prompts of 6 and 4 tokens (row 1 left-padded by 2), 24 tokens in blocks of 8, one per step,
    window 5 + tail: T = 30; block 0 = [6, 14) keeps 14..18 and 29, block 1 = [14, 22) keeps 22..26
    and 29, block 2 = [22, 30) has nothing to prune (keys None, its block start a full forward)."""
    cache = Recorder(build_cache("streaming", window=5, tail=True, base=base))
    out = generate(peaked(family), random_prompts((6, 4)), low_confidence(), cache, GEN)
    T = 30
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, :2] = False
    suffixes = {0: [14, 15, 16, 17, 18, 29], 1: [22, 23, 24, 25, 26, 29], 2: None}
    assert len(cache.steps) == GEN
    for step, rec in enumerate(cache.steps):
        block, block_step = divmod(step, BLOCK)
        lo, hi = 6 + block * BLOCK, 6 + (block + 1) * BLOCK
        suffix = suffixes[block]
        keys = rec["request"].keys
        if suffix is None:
            assert keys is None, f"step {step}"
            kept = torch.ones(2, T, dtype=torch.bool)
        else:
            kept = torch.zeros(2, T, dtype=torch.bool)
            kept[:, :hi] = True
            kept[:, suffix] = True
            assert torch.equal(keys, kept), f"step {step}"
        if block_step == 0:
            expected = kept & real if suffix is not None else torch.ones(2, T, dtype=torch.bool)
        else:
            expected = torch.zeros(2, T, dtype=torch.bool)
            expected[:, lo : T if base == "prefix" else hi] = True
            expected &= kept
            if family == "dream":  # position lo is predicted from row lo - 1 while it is masked
                expected[:, lo - 1] = rec["masked"][:, lo]
        assert torch.equal(rec["active"], expected), f"step {step}"
    pruned = generate(peaked(family), random_prompts((6, 4)), low_confidence(), build_cache(base), GEN)
    assert out.attention_pairs < pruned.attention_pairs and out.recompute_ratio < pruned.recompute_ratio


def test_refresh_interval_recomputes_the_kept_positions_only(family):
    """refresh_interval 3: block steps 0, 3 and 6 recompute every kept position and nothing pruned."""
    cache = Recorder(build_cache("streaming", window=5, tail=True, refresh_interval=3))
    generate(peaked(family), random_prompts((6,)), low_confidence(), cache, GEN)
    kept = torch.zeros(1, 30, dtype=torch.bool)
    kept[:, :14] = True
    kept[:, [14, 15, 16, 17, 18, 29]] = True
    for block_step in range(BLOCK):  # block 0
        active = cache.steps[block_step]["active"]
        if block_step % 3 == 0:
            assert torch.equal(active, kept), block_step
        else:
            assert not active[:, :5].any() and not active[:, 19:29].any(), block_step


@pytest.mark.parametrize("base", ["prefix", "dual"])
@pytest.mark.parametrize("decoding", ["low_confidence", "threshold"])
@pytest.mark.parametrize("lengths", [(7,), (7, 3, 10)])
def test_without_pruning_it_is_the_base_cache(family, base, decoding, lengths):
    """window null, or a window longer than any suffix: the base cache's tokens and costs."""
    net, prompts, make = peaked(family), random_prompts(lengths), DECODERS[decoding]
    reference = generate(net, prompts, make(), build_cache(base), GEN)
    for window in (None, GEN):
        out = generate(net, prompts, make(), build_cache("streaming", window=window, base=base), GEN)
        assert torch.equal(out.tokens, reference.tokens), window
        assert out.token_layers_per_forward == reference.token_layers_per_forward, window
        assert out.attention_pairs == reference.attention_pairs, window


def authors_loop(net, prompt: list[int], window: int) -> list[int]:
    """Re-statement of the authors' ``generate_with_prefix_cache`` (batch 1, one token per step,
    lowest-confidence-first): per block, the sequence is cut to [0, hi) + the window + the last
    position, keeping RoPE positions; a forward over all of it fills a store of that length, then
    each step recomputes the rows from the block on against the stored prefix. On Dream the
    prediction for j comes from row j - 1 (row lo - 1 recomputed while lo is masked)."""
    args, shift = net.args, net.args.logit_shift
    x = prompt + [MASK_ID] * GEN
    T = len(x)
    for lo in range(len(prompt), T, BLOCK):
        hi = lo + BLOCK
        suffix = list(range(hi, T))
        if len(suffix) > window:
            suffix = suffix[:window] + suffix[-1:]
        seq = list(range(hi)) + suffix  # slot s holds position seq[s]
        store = KVStore(args, 1, len(seq), net.device, net.dtype)
        attend = torch.ones(1, 1, 1, len(seq) + 1, dtype=torch.bool)
        attend[..., -1] = False  # the store's trash slot
        for block_step in range(BLOCK):
            if block_step == 0:
                slots = list(range(len(seq)))
            else:
                slots = [s for s, p in enumerate(seq) if p >= lo or (shift and p == lo - 1 and x[lo] == MASK_ID)]
            index = torch.tensor([slots])
            hidden, _ = net.hidden(torch.tensor([[x[seq[s]] for s in slots]]), torch.tensor([[seq[s] for s in slots]]),
                                   attend, store, None if block_step == 0 else index)
            logits = net.output(hidden)[0].double()
            row_of = {seq[s]: r for r, s in enumerate(slots)}
            best = None
            for j in range(lo, hi):
                if x[j] == MASK_ID:
                    probs = logits[row_of[j - shift]].softmax(-1)
                    conf, token = probs.max(-1)
                    if best is None or conf > best[0]:
                        best = (conf, j, int(token))
            x[best[1]] = best[2]
    return x[len(prompt):]


@pytest.mark.parametrize("window", [0, 5])
def test_matches_a_restatement_of_the_authors_loop(family, window):
    net = peaked(family)
    prompt = random_prompts((7,), seed=3)[0]
    out = generate(net, [prompt], low_confidence(), build_cache("streaming", window=window), GEN)
    assert out.tokens[0].tolist() == authors_loop(net, prompt, window)


@pytest.mark.parametrize("decoding", ["low_confidence", "threshold"])
@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_a_generation_never_ends_with_mask(family, decoding, stop_at_eos):
    """The most aggressive pruning (no window, no tail) with both bases and a ragged batch."""
    net = tiny_net(tiny_args(family), logit_scale=8.0)  # [MASK] and EOS may be the model's argmax
    for base in ("prefix", "dual"):
        cache = build_cache("streaming", window=0, tail=False, base=base)
        out = generate(net, random_prompts((7, 3, 10), seed=1), DECODERS[decoding](), cache, GEN,
                       stop_at_eos=stop_at_eos)
        assert not (out.tokens == MASK_ID).any(), base


@pytest.mark.parametrize("setting,message", [
    (dict(window=-1), "cache.window=-1"),
    (dict(window=2.5), "cache.window=2.5"),
    (dict(window=True), "cache.window=True"),
    (dict(tail="yes"), "cache.tail='yes'"),
    (dict(base="full"), r"cache.base='full' \(allowed: \['prefix', 'dual'\]\)"),
    (dict(refresh_interval=0), "cache.refresh_interval=0"),
])
def test_bad_settings_are_named(setting, message):
    with pytest.raises(ValueError, match=message):
        build_cache("streaming", **setting)
