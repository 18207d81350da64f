"""decoding=klass (KL-Adaptive Stability Sampling, arXiv 2511.05664): the stability rule pinned on
hand-made distributions driven step by step as the loop drives a decoder, its fallback and block
budget, composition with the cache methods on tiny models, and the refusal of bad hyperparameters."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MASK_ID, compose, random_prompts, subprocess_env, tiny_args, tiny_net, trained_tiny
from dllm.cache.base import build_cache
from dllm.decoding.base import DecodeContext, build_decoder
from dllm.decoding.loop import generate
from dllm.pipeline import plan_run

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------ hand-made distributions

V = 5  # token 4 is [MASK]
P, G = 1, 6
T = P + G
NAMES = {1: "S0", 2: "S1", 3: "A", 4: "B", 5: "C", 6: "E"}
POS = {name: pos for pos, name in NAMES.items()}


def sink(t: int, top: float) -> list[float]:
    """Confident but never stable: the favourite token moves every step."""
    rest = (1 - top) / 4
    return [top if i == t % 4 else rest for i in range(V)]


CONST_HI = [0.9, 0.04, 0.03, 0.02, 0.01]  # stable, confidence 0.9 (C)
CONST_A = [0.85, 0.06, 0.05, 0.02, 0.02]  # stable, confidence 0.85 (A)
LOW = [0.4, 0.3, 0.2, 0.05, 0.05]  # stable, confidence 0.4
Q, R = [0.6, 0.3, 0.05, 0.03, 0.02], [0.5, 0.4, 0.05, 0.03, 0.02]  # E alternates: KL ~ 0.023 / 0.024


def kl(p, q) -> float:
    return sum(a * (math.log(a + 1e-12) - math.log(b + 1e-12)) for a, b in zip(p, q))


def distributions(t: int, c_fresh_at_1: bool = False) -> dict[str, list[float]]:
    """What the model predicts at step t (only the fresh positions: C is stale at step 1)."""
    out = {"S0": sink(t, 0.99), "S1": sink(t, 0.98), "A": CONST_A, "B": LOW, "C": CONST_HI, "E": Q if t % 2 == 0 else R}
    if t == 1 and not c_fresh_at_1:
        del out["C"]
    return out


class Driver:
    """Runs plan / propose / priority / select as the loop does (batch 1), one step at a time."""

    def __init__(self, **params):
        params = {"steps": G, "block_length": None, "conf_threshold": 0.45, "kl_threshold": 0.01, **params}
        self.decoder = build_decoder("klass", **params)
        self.decoder.check(G)
        self.decoder.start(DecodeContext(1, P, G, V - 1, torch.ones(1, T, dtype=torch.bool), None, torch.device("cpu")))
        self.masked = torch.ones(1, T, dtype=torch.bool)
        self.masked[:, :P] = False
        self.step = 0

    def __call__(self, fresh: dict[str, list[float]]) -> set[str]:
        plan = self.decoder.plan(self.step, self.masked)
        self.plan = plan
        fresh = {POS[n]: p for n, p in fresh.items() if self.masked[0, POS[n]]}  # the loop: masked only
        order = sorted(fresh)
        rows = [fresh[p] for p in order] + [CONST_HI]  # + a padding entry (target T): ignored
        targets = torch.tensor([order + [T]])
        tokens, confidence = self.decoder.propose(torch.log(torch.tensor([rows])), targets)
        fresh_conf = torch.full((1, T + 1), float("nan"), dtype=torch.float64).scatter(1, targets, confidence.double())[:, :T]
        score = self.decoder.priority(fresh_conf, self.masked).masked_fill(fresh_conf.isnan(), float("-inf"))
        chosen = self.decoder.select(score, plan)
        assert not (chosen & ~self.masked).any() and int(chosen.sum()) >= int(plan.n_transfer.sum())
        self.masked &= ~chosen
        self.step += 1
        return {NAMES[p] for p in chosen[0].nonzero().flatten().tolist()}


def run_steps(n: int, c_fresh_at_1: bool = False, **params) -> list[set[str]]:
    drive = Driver(**params)
    return [drive(distributions(t, c_fresh_at_1)) for t in range(n)]


def test_premises_of_the_hand_made_distributions():
    assert 0.01 < kl(R, Q) < 0.05 and 0.01 < kl(Q, R) < 0.05
    assert kl(sink(1, 0.99), sink(0, 0.99)) > 1


def test_commits_after_history_consecutive_low_kl_recomputations():
    # step 0: no predecessor (KL inf) -> fallback, the most confident (S0); step 1: A's KLs [inf, 0]
    # -> fallback S1; step 2: A [0, 0] ready; C was stale at step 1: [inf, 0], not yet; step 3: C.
    # E's KL ~0.023 each step stays above 0.01; B (0.4) is never confident enough.
    assert run_steps(4) == [{"S0"}, {"S1"}, {"A"}, {"C"}]


def test_the_kl_is_current_against_previous_and_only_below_the_threshold_counts():
    drive = Driver(kl_threshold=0.05)
    for t in range(3):
        drive(distributions(t))
    register = drive.decoder.kl[0, POS["E"] - P].tolist()
    assert register == pytest.approx([kl(R, Q), kl(Q, R)], rel=1e-5)  # KL(p_t || p_{t-1}), oldest first
    assert run_steps(3, kl_threshold=0.05)[2] == {"A", "E"}
    assert run_steps(3, kl_threshold=0.0235)[2] == {"A"}  # E's last two: 0.0231 (< ) and 0.0239 (not)


def test_a_stale_position_keeps_its_history():
    """C stale at step 1: its history counts its recomputations, not loop steps."""
    assert run_steps(3)[2] == {"A"}
    assert run_steps(3, c_fresh_at_1=True)[2] == {"A", "C"}
    drive = Driver()
    drive(distributions(0))
    before = (drive.decoder.kl[0, POS["C"] - P].clone(), drive.decoder.prev[0, POS["C"] - P].clone())
    drive(distributions(1))
    assert torch.equal(drive.decoder.kl[0, POS["C"] - P], before[0])
    assert torch.equal(drive.decoder.prev[0, POS["C"] - P], before[1])


@pytest.mark.parametrize("history, expected", [
    (1, [{"S0"}, {"A", "C"}]),  # one KL below the threshold suffices from the second prediction on
    (2, [{"S0"}, {"S1"}, {"A", "C"}]),
    (3, [{"S0"}, {"S1"}, {"C"}, {"A"}]),  # step 2: nothing ready, the fallback's most confident (C, 0.9)
])
def test_history_length(history, expected):
    assert run_steps(len(expected), c_fresh_at_1=True, history=history) == expected


def test_confidence_must_exceed_the_threshold():
    steps = run_steps(4, c_fresh_at_1=True, conf_threshold=0.95)  # nothing stable is confident enough
    assert steps[:2] == [{"S0"}, {"S1"}] and all(len(s) == 1 for s in steps)
    steps = run_steps(3, c_fresh_at_1=True, conf_threshold=0.3)  # B (0.4) now qualifies
    assert steps[2] == {"A", "B", "C"}


def test_fallback_takes_llada_schedule_count_and_the_last_step_takes_the_rest():
    # steps=3 over 6 tokens: the fallback takes 2 per step (LLaDA's counts), the most confident.
    drive = Driver(steps=3)
    assert drive(distributions(0)) == {"S0", "S1"}
    assert int(drive.plan.n_transfer) == 1  # only one is guaranteed (ready tokens may be fewer)
    assert drive(distributions(1)) == {"A", "E"}  # A [inf, 0]: not ready; C stale -> the two most confident
    assert drive(distributions(2)) == {"B", "C"}  # the block's last budgeted step: everything left
    assert int(drive.plan.n_transfer) == 2
    assert drive.decoder.plan(3, drive.masked) is None


def test_blocks_and_block_gate():
    """Blocks of 3: a block ends once no masked token is left in it; with window=rest later positions
    gather history meanwhile, but the block's first history - 1 steps commit nothing by stability."""
    drive = Driver(block_length=3, window="rest")
    chosen = [drive(distributions(t, c_fresh_at_1=True)) for t in range(4)]
    assert chosen[:3] == [{"S0"}, {"S1"}, {"A"}]  # block [1, 4)
    assert drive.plan.window == (4, T) and drive.plan.block_step == 0
    assert chosen[3] == {"C"}  # C stable ([0, 0]) but the gate: the fallback's most confident (C)
    drive = Driver(block_length=3, window="block")
    chosen = [drive(distributions(t, c_fresh_at_1=True)) for t in range(3)]
    assert drive.decoder.width == 3 and drive.plan.window == (1, 4)


# ------------------------------------------------------------------------------- tiny models

GEN, BLOCK = 16, 8
LENGTHS = (6, 9, 3)
REFRESH_EVERY_STEP = {"dkv_decode": dict(refresh_interval=1), "prefix": dict(refresh_interval=1),
                      "dual": dict(refresh_interval=1), "d2cache": dict(refresh_interval=1)}


def net_of(family: str):
    return tiny_net(tiny_args(family), logit_scale=8.0, silent_ids=(MASK_ID,))


def make(window: str, block_length=BLOCK):
    return build_decoder("klass", steps=GEN, block_length=block_length, conf_threshold=0.5, kl_threshold=0.05,
                         window=window)


@pytest.mark.parametrize("window", ["rest", "block"])
def test_decodes_everything_and_commits_several_tokens_per_step(family, window):
    decoder = make(window)
    counts, inner = [], decoder.select

    def select(score, plan):
        chosen = inner(score, plan)
        counts.append(chosen.sum(1))
        return chosen

    decoder.select = select
    out = generate(net_of(family), random_prompts(LENGTHS), decoder, build_cache("none"), GEN)
    assert not (out.tokens == MASK_ID).any() and out.nfe <= GEN
    assert max(int(c.max()) for c in counts) > 1  # the stability rule committed several tokens of a row at once


@pytest.mark.parametrize("method", ["dkv_decode", "prefix", "dual", "d2cache"])
@pytest.mark.parametrize("window", ["rest", "block"])
def test_composes_with_cache_methods(family, method, window):
    """No [MASK] left under the method's defaults; with its refresh forced every step the tokens
    are cache=none's."""
    net, prompts = net_of(family), random_prompts(LENGTHS)
    base = generate(net, prompts, make(window), build_cache("none"), GEN)
    out = generate(net, prompts, make(window), build_cache(method), GEN)
    assert not (out.tokens == MASK_ID).any() and out.recompute_ratio < 1 and out.nfe <= GEN
    forced = generate(net, prompts, make(window), build_cache(method, **REFRESH_EVERY_STEP[method]), GEN)
    assert torch.equal(forced.tokens, base.tokens)


def test_dkv_greedy_refuses_it():
    with pytest.raises(ValueError):
        build_cache("dkv_greedy").check(make("rest"))


# --------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("params, message", [
    (dict(conf_threshold=1.5), r"decoding.conf_threshold=1.5 must be a number in \[0, 1\]"),
    (dict(conf_threshold=-0.1), r"decoding.conf_threshold=-0.1"),
    (dict(conf_threshold=float("nan")), "decoding.conf_threshold=nan"),
    (dict(conf_threshold="0.9"), "decoding.conf_threshold='0.9'"),
    (dict(kl_threshold=0), "decoding.kl_threshold=0 must be a number > 0"),
    (dict(kl_threshold=-1.0), "decoding.kl_threshold=-1.0"),
    (dict(kl_threshold=True), "decoding.kl_threshold=True"),
    (dict(history=0), "decoding.history=0 must be an integer >= 1"),
    (dict(history=1.5), "decoding.history=1.5"),
    (dict(history=True), "decoding.history=True"),
    (dict(window="all"), r"decoding.window='all' \(allowed: \['rest', 'block'\]\)"),
    (dict(block_length=0), "decoding.block_length=0 must be an integer >= 1"),
    (dict(temperature=-1), "decoding.temperature=-1"),
    (dict(steps=0), "decoding.steps=0 must be an integer >= 1"),
    (dict(threshold=0.9), "no parameter decoding.threshold"),
    (dict(fallback_dtype="float32"), r"decoding.fallback_dtype='float32' \(allowed: \['float64', 'logits'\]\)"),
])
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        build_decoder("klass", **params)


def test_schedule_is_checked():
    with pytest.raises(ValueError, match="gen_length=20 is not divisible by block_length=8"):
        build_decoder("klass", block_length=8).check(20)
    with pytest.raises(ValueError, match="steps=3 is not divisible by the number of blocks"):
        build_decoder("klass", steps=3, block_length=8).check(16)


def test_yaml_defaults():
    d = plan_run(compose("decoding=klass")).decoder
    assert (d.name, d.steps_asked, d.block_length, d.conf_threshold, d.kl_threshold, d.history, d.window,
            d.temperature) == ("klass", 64, 64, 0.9, 0.01, 2, "rest", 0.0)
    assert not d.order_known_in_advance and d.confidence_is_probability


def test_run_py(tmp_path):
    csv = tmp_path / "klass.csv"
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "decoding=klass", "task.limit=4", f"results_csv={csv}"],
                          cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert csv.exists() and "decoding=klass" in done.stdout + done.stderr


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_row_of_a_batch_decodes_as_alone_on_a_trained_model(family):
    """One block for the batch: a row done with it waits, and the predictions of its waiting steps
    are not recorded (they would be KL 0 and make its later positions look stable early)."""
    net, prompts = trained_tiny(family)
    params = dict(steps=32, block_length=16)
    batch = generate(net, prompts, build_decoder("klass", **params), build_cache("none"), 32)
    alone = [generate(net, [p], build_decoder("klass", **params), build_cache("none"), 32) for p in prompts]
    assert [b.tolist() for b in batch.tokens] == [a.tokens[0].tolist() for a in alone]
    assert len({a.nfe for a in alone}) > 1  # the rows finish their blocks at different steps


def dream_klass(net, prompt, gen_length, conf_threshold, kl_threshold, history):
    """Our reading of the authors' Dream variant (src/model/dream_klass.py), batch 1, one block, steps =
    gen_length, full forwards: KL of the float64 softmax against the previous one (an all-zero start),
    ready when the last ``history`` KL values are < kl_threshold and the float64 confidence >=
    conf_threshold; all ready positions committed, else one: the first maximum of the float32 softmax's
    top probability over the masked positions. Returns the response and the number of forwards."""
    mask, V = net.args.mask_token_id, net.args.vocab_size
    x = torch.tensor([prompt + [mask] * gen_length])
    previous = torch.zeros(1, x.shape[1], V, dtype=torch.float64)
    kls = torch.zeros(1, x.shape[1], history, dtype=torch.float64)
    for forwards in range(gen_length):
        masked = x == mask
        if not masked.any():
            return x[0, len(prompt):].tolist(), forwards
        with torch.no_grad():
            logits = net(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position j predicted from j - 1
        tokens = torch.zeros_like(x)
        tokens[masked] = logits[masked].argmax(-1)
        probs = torch.softmax(logits.double(), dim=-1)
        kl = (probs * (torch.log(probs + 1e-12) - torch.log(previous + 1e-12))).sum(-1)
        kls = torch.cat([kls[..., 1:], kl[..., None]], dim=-1)
        previous = probs
        confidence = probs.gather(-1, tokens[..., None])[..., 0]
        ready = (kls < kl_threshold).all(-1) & (confidence >= conf_threshold) & masked
        if ready.any():
            x[ready] = tokens[ready]
        else:
            top = torch.softmax(logits[masked], dim=-1).max(-1).values  # the logits' float32
            position = masked[0].nonzero()[int(top.argmax())]
            x[0, position] = tokens[0, position]
    return x[0, len(prompt):].tolist(), gen_length


def test_dream_fallback_in_the_logits_dtype_equals_the_authors_dream_code():
    """fallback_dtype=logits ranks KLASS's one-token fallback as the authors' Dream code does (a float32
    softmax, the first maximum): tokens and forward counts equal on the trained tiny Dream, where the
    float64 default differs (the rounding reorders near-ties)."""
    net, prompts = trained_tiny("dream")
    differs = 0
    for gen, conf, kl, history in ((64, 0.9, 0.001, 2), (48, 0.8, 0.001, 2), (32, 0.9, 0.005, 3)):
        for prompt in prompts:
            tokens, forwards = dream_klass(net, prompt, gen, conf, kl, history)
            runs = {dtype: generate(net, [prompt], build_decoder("klass", steps=gen, block_length=None, conf_threshold=conf,
                                                                 kl_threshold=kl, history=history, fallback_dtype=dtype),
                                    build_cache("none"), gen) for dtype in ("logits", "float64")}
            assert (runs["logits"].tokens[0].tolist(), runs["logits"].nfe) == (tokens, forwards)
            differs += (runs["float64"].tokens[0].tolist(), runs["float64"].nfe) != (tokens, forwards)
    assert differs
