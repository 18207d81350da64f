"""dKV-Cache-Decode's ``shift_rule``: the position rules of the authors' Dream code (``shift_type``
un / un_right / right), traced by hand; its refusal on LLaDA; Table 2's pin; and the
generation_config.json that Dream's own loading code needs in the tiny Dream checkpoints.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dllm.cache.base import build_cache
from dllm.decoding.base import build_decoder
from dllm.decoding.llada import LowConfidence
from dllm.decoding.loop import generate
from dllm.models.tiny import DREAM_GENERATION_CONFIG, ensure_tiny, make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EOS_ID, MASK_ID, PAD_ID, Recorder, compose, random_prompts, tiny_args, tiny_net  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
P, G = 4, 8  # prompt 0..3, response 4..11
T = P + G


pytestmark = pytest.mark.usefixtures("one_thread")


class Ordered(LowConfidence):
    """One token per step in a fixed order: left to right (or right to left), among fresh positions."""

    name = "ordered_test"

    def __init__(self, steps: int, right_to_left: bool = False) -> None:
        super().__init__(steps)
        self.sign = 1.0 if right_to_left else -1.0

    def priority(self, confidence, masked):
        return self.sign * torch.arange(masked.shape[1], dtype=torch.float64).expand(masked.shape)


def dream_net(seed: int = 11):
    return tiny_net(tiny_args("dream"), seed=seed, logit_scale=4.0, silent_ids=(MASK_ID, PAD_ID, EOS_ID))


def run(rule: str, refresh: int = 4, right_to_left: bool = False, variant: str = "decode", net=None):
    rec = Recorder(build_cache("dkv_decode", refresh_interval=refresh, variant=variant, shift_rule=rule))
    prompt = random_prompts([P], seed=5)
    out = generate(net or dream_net(), prompt, Ordered(G, right_to_left), rec, G, record_trace=True)
    return out, rec


def positions(active: torch.Tensor) -> list[int]:
    return active[0].nonzero().flatten().tolist()


def span(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi + 1))


# --------------------------------------------------------------------------------- hand-traced sets
# Left to right, step s unmasks 4 + s: masked when step s begins M_s = {4+s..11}; the reference's
# "prev" at step s is M_{s-1} = {3+s..11}. R = 4: steps 0 and 4 are full forwards; step 1 is the
# reference's initial set {p : p+1 masked at step 0} + the last position = {3..11}.
ALL = span(0, 11)
HAND_L2R = {
    # un: p with prev[p+1]; the last position (11) never after step 1.
    "un": [ALL, span(3, 11), span(4, 10), span(5, 10), ALL, span(7, 10), span(8, 10), [9, 10]],
    # un_right: p with prev[p] or prev[p+1]; 11 as 10.
    "un_right": [ALL, span(3, 11), span(4, 11), span(5, 11), ALL, span(7, 11), span(8, 11), [9, 10, 11]],
    # right: p with prev[p] (the predecessors of masked positions are in it already).
    "right": [ALL, span(3, 11), span(5, 11), span(6, 11), ALL, span(8, 11), span(9, 11), [10, 11]],
    # ours (unchanged default): steps 0, 1, 4 full; masked + decoded last step + predecessors of masked.
    "ours": [ALL, ALL, span(5, 11), span(6, 11), ALL, span(8, 11), span(9, 11), [10, 11]],
}
# Right to left, step s unmasks 11 - s: M_s = {4..11-s}, prev = M_{s-1} = {4..12-s}.
HAND_R2L = {
    # un: {3..11-s}: position 12-s, decoded last step, is *not* recomputed (its right neighbour was
    # already known), unlike ours.
    "un": [ALL, span(3, 11), span(3, 9), span(3, 8), ALL, span(3, 6), span(3, 5), [3, 4]],
    # un_right: {3..12-s}, and the last position while 10 is in it (s <= 2).
    "un_right": [ALL, span(3, 11), span(3, 11), span(3, 9), ALL, span(3, 7), span(3, 6), span(3, 5)],
    # right: the reference recomputes prev = {4..12-s} only, so position 4 would be predicted from
    # position 3's stale row (-inf logits there); we add 3, the predecessor of a masked position.
    "right": [ALL, span(3, 11), span(3, 10), span(3, 9), ALL, span(3, 7), span(3, 6), span(3, 5)],
}


@pytest.mark.parametrize("rule", ["un", "un_right", "right", "ours"])
def test_hand_traced_left_to_right(rule):
    out, rec = run(rule)
    assert [positions(s["transferred"]) for s in rec.steps] == [[4 + s] for s in range(G)]  # the order
    assert [positions(a) for a in out.trace] == HAND_L2R[rule]
    full = [0, 4] if rule != "ours" else [0, 1, 4]
    assert [s for s, step in enumerate(rec.steps) if step["full"]] == full
    assert not (out.tokens == MASK_ID).any()


@pytest.mark.parametrize("rule", ["un", "un_right", "right"])
def test_hand_traced_right_to_left(rule):
    out, rec = run(rule, right_to_left=True)
    assert [positions(s["transferred"]) for s in rec.steps] == [[11 - s] for s in range(G)]
    assert [positions(a) for a in out.trace] == HAND_R2L[rule]


def test_pd_keeps_the_prompt_but_its_last_position_cached():
    # pd + un: the refresh step (4) recomputes the reference's non-prefill set {3..11}, not all.
    out, _ = run("un", variant="pd")
    expected = list(HAND_L2R["un"])
    expected[4] = span(3, 11)
    assert [positions(a) for a in out.trace] == expected


def test_refresh_1_is_cache_none():
    net = dream_net()
    prompts = random_prompts([7, 4, 10], seed=3)
    base = generate(net, prompts, build_decoder("dream", steps=G, alg="entropy"), build_cache("none"), G)
    for rule in ("un", "un_right", "right"):
        out = generate(net, prompts, build_decoder("dream", steps=G, alg="entropy"),
                       build_cache("dkv_decode", refresh_interval=1, shift_rule=rule), G)
        assert torch.equal(out.tokens, base.tokens) and out.recompute_ratio == 1.0


def plain_reference(prev: list[bool], rule: str, first: bool) -> list[bool]:
    """The reference's recomputed positions, one position at a time (prev: masked at the previous step's start)."""
    n = len(prev)
    if first:
        return [prev[p + 1] for p in range(n - 1)] + [prev[-1]]
    if rule == "un":
        return [prev[p + 1] for p in range(n - 1)] + [False]
    if rule == "un_right":
        body = [prev[p] or prev[p + 1] for p in range(n - 1)]
        return body + [body[-1]]
    return list(prev)


@pytest.mark.parametrize("rule", ["un", "un_right", "right"])
def test_dream_decoding_batch_follows_the_rule(rule):
    # Dream's own entropy decoding (several tokens per step, data-dependent order), a left-padded
    # batch: every cached step recomputes the reference's set (+ predecessors of masked positions).
    prompts = random_prompts([7, 4, 10], seed=3)
    rec = Recorder(build_cache("dkv_decode", refresh_interval=3, shift_rule=rule))
    out = generate(dream_net(), prompts, build_decoder("dream", steps=8, alg="entropy"), rec, 16, record_trace=True)
    width = 10
    for s, step in enumerate(rec.steps):
        assert step["full"] == (s % 3 == 0)
        if step["full"]:
            continue
        for b, prompt in enumerate(prompts):
            prev = rec.steps[s - 1]["masked"][b].tolist()
            expected = plain_reference(prev, rule, first=s == 1)
            masked = step["masked"][b].tolist()
            expected = [e or (p + 1 < len(masked) and masked[p + 1]) for p, e in enumerate(expected)]
            expected = [e and p >= width - len(prompt) for p, e in enumerate(expected)]  # no padding rows
            assert out.trace[s][b].tolist() == expected, (s, b)
    assert not (out.tokens == MASK_ID).any()


# ------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("rule", ["un", "un_right", "right"])
def test_llada_refuses_reference_rules(rule):
    net = tiny_net(tiny_args("llada"), seed=0)
    cache = build_cache("dkv_decode", shift_rule=rule)
    with pytest.raises(ValueError, match=rf"cache.shift_rule='{rule}'.*logit_shift=0"):
        generate(net, random_prompts([5]), build_decoder("low_confidence", steps=4, block_length=4), cache, 4)
    # ours is fine on LLaDA
    generate(net, random_prompts([5]), build_decoder("low_confidence", steps=4, block_length=4),
             build_cache("dkv_decode"), 4)


@pytest.mark.parametrize("params,needle", [
    (dict(shift_rule="left"), "cache.shift_rule='left'"),
    (dict(shift_rule="un", variant="prefill"), "variant=decode or pd"),
])
def test_bad_shift_rule(params, needle):
    with pytest.raises(ValueError) as err:
        build_cache("dkv_decode", **params)
    assert needle in str(err.value)
    if "left" in needle:
        assert "['ours', 'un', 'un_right', 'right']" in str(err.value)


def test_configs():
    assert compose("cache=dkv_decode").cache.shift_rule == "ours"
    for method, rule in (("dkv_decode", "un"), ("dkv_pd", "un"), ("dkv_prefill", None)):
        cfg = compose("+experiment=dkv_table2", f"method={method}")
        assert cfg.cache.get("shift_rule") == rule
        params = {k: v for k, v in cfg.cache.items() if k != "name"}
        assert build_cache(cfg.cache.name, **params).shift_rule == (rule or "ours")


# ------------------------------------------------------------------ Dream's generation_config.json

def check_generation_config(folder: Path) -> None:
    from transformers import GenerationConfig

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in tokenizer["added_tokens_decoder"].items()}
    gen = json.loads((folder / "generation_config.json").read_text())
    eos = ids["<|endoftext|>"]
    assert gen["bos_token_id"] == gen["eos_token_id"] == gen["pad_token_id"] == eos == config["eos_token_id"]
    # As published: the mask id is null there; Dream's generation code reads it from config.json.
    assert gen["mask_token_id"] is None and config["mask_token_id"] == ids["<|mask|>"]
    assert {k: v for k, v in gen.items() if not k.endswith("token_id")} == {
        k: v for k, v in DREAM_GENERATION_CONFIG.items() if not k.endswith("token_id")}
    # DreamModel.from_pretrained loads it with DreamGenerationConfig.from_pretrained (a subclass
    # that pops alg / steps / ... itself); the base class must read it and the ids.
    loaded = GenerationConfig.from_pretrained(folder)
    assert loaded.bos_token_id == loaded.eos_token_id == loaded.pad_token_id == eos


def test_trained_dream_asset_has_generation_config():
    check_generation_config(REPO / "assets" / "tiny_dream")


def test_made_dream_checkpoint_has_generation_config(tmp_path):
    check_generation_config(make_tiny_checkpoint("dream", tmp_path / "dream"))
    assert not (make_tiny_checkpoint("llada", tmp_path / "llada") / "generation_config.json").exists()


def checkpoint_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint_script", REPO / "scripts" / "make_tiny_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_writes_generation_config(tmp_path):
    checkpoint_script().main(["--family", "dream", "--out", str(tmp_path / "d")])
    check_generation_config(tmp_path / "d")


def test_script_refuses_an_out_it_cannot_write_to(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --out '' used to write the checkpoint here
    cases = [("", "--out '': give a folder to write to"), (__file__, f"--out {__file__}: {__file__} is a file, not a folder")]
    if Path("/proc/self").is_dir():  # Linux: no folder can be made in /proc
        cases.append(("/proc/x", "--out /proc/x: cannot make the folder (No such file"))
    for out, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            checkpoint_script().main(["--family", "llada", "--out", out])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cached_tiny_dream_gets_generation_config(tmp_path):
    first = ensure_tiny("dream", tmp_path)
    (first / "generation_config.json").unlink()  # a folder cached before the file was written
    assert ensure_tiny("dream", tmp_path) == first
    check_generation_config(first)
    assert sorted(p.name for p in first.iterdir() if p.name.startswith(".")) == []
