"""Shared fixtures: tiny random models of both families (CPU, offline, deterministic), and the
offline environment of the end-to-end tests."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from dllm.cache.base import ActiveRequest, CacheMethod, StepOutcome, StepView
from dllm.models.packed import pack_linear_weights
from dllm.models.transformer import ModelArgs, Transformer

FAMILIES = ("llada", "dream")
CACHE_DIRS = ("HF_HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "MPLCONFIGDIR")


def offline_env(base: Path) -> dict[str, str]:
    """Offline switches, and every cache / config folder under ``base`` (nothing goes to $HOME)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "DLLM_CACHE": str(base / "dllm")}
    env.update({name: str(base / name.lower()) for name in CACHE_DIRS})
    return env


def compose(*overrides: str):
    """The run config of ``python run.py OVERRIDES`` (conf/config.yaml), without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def subprocess_env(base: Path) -> dict[str, str]:
    """The whole environment of a ``run.py`` subprocess: ours + the offline switches, one thread,
    and no code-execution opt-in inherited from the shell."""
    env = {**os.environ, **offline_env(base), "OMP_NUM_THREADS": "1"}
    env.pop("HF_ALLOW_CODE_EVAL", None)
    return env

# Token ids of the tiny vocabulary: real tokens are drawn from [0, N_REAL); the special ids sit above.
TINY_VOCAB = 64
N_REAL = 60
PAD_ID, EOS_ID, MASK_ID = 61, 62, 63


def tiny_args(family: str = "llada", **overrides) -> ModelArgs:
    """A small ModelArgs of either family (GQA by default: 4 heads, 2 KV heads)."""
    base = dict(
        family=family,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        vocab_size=TINY_VOCAB,
        rope_theta=500000.0 if family == "llada" else 1e6,
        norm_eps=1e-5 if family == "llada" else 1e-6,
        qkv_bias=family == "dream",
        tie_embeddings=False,
        max_seq_len=256,
        mask_token_id=MASK_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        logit_shift=1 if family == "dream" else 0,
    )
    base.update(overrides)
    return ModelArgs(**base)


def tiny_net(
    args: ModelArgs,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    logit_scale: float = 1.0,
    silent_ids: tuple[int, ...] = (),
) -> Transformer:
    """A Transformer with random weights, including non-trivial norm weights and biases.

    ``logit_scale`` multiplies the LM head so that predictions are peaked (decoding tests);
    ``silent_ids`` get a zero LM-head row (logit 0, far below the best of the other random
    logits), so that a random model does not predict e.g. the mask token.
    """
    gen = torch.Generator().manual_seed(seed)
    net = Transformer(args)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # linear weights, fan-in scaled
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        net.output.weight.mul_(logit_scale)
        for token in silent_ids:
            net.output.weight[token] = 0.0
    return net.to(dtype).eval().requires_grad_(False)


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N_REAL, (n,), generator=gen).tolist() for n in lengths]


_TRAINED: dict[str, tuple[Transformer, list[list[int]]]] = {}


def trained_tiny(family: str) -> tuple[Transformer, list[list[int]]]:
    """A committed trained tiny checkpoint (assets/tiny_<family>) and four held-out arith prompts
    of different lengths (chat template; the 2nd and 3rd shortened from the left, the 4th cut to 12
    tokens), for checks that need decoders whose thresholds only a trained model clears."""
    if family not in _TRAINED:
        from dllm.eval.arith_data import load_test, prompt_text
        from dllm.models.loading import load_model
        from dllm.models.tokenization import encode_prompts, load_tokenizer

        folder = Path(__file__).resolve().parents[1] / "assets" / f"tiny_{family}"
        questions = [prompt_text(doc["question"]) for doc in load_test()[:4]]
        prompts = encode_prompts(load_tokenizer(folder), questions, chat=True)
        prompts = [prompts[0], prompts[1][7:], prompts[2][3:], prompts[3][:12]]
        _TRAINED[family] = load_model(str(folder)), prompts
    return _TRAINED[family]


@pytest.fixture
def make_args():
    return tiny_args


@pytest.fixture
def make_net():
    return tiny_net


@pytest.fixture
def make_prompts():
    return random_prompts


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


WEIGHTS = ("dense", "packed")


def with_weights(net: Transformer, weights: str) -> Transformer:
    """``net`` as is ("dense") or with its linear weights prepacked, as the pipeline runs a float32
    model on CPU ("packed"; skips the test where oneDNN is not available)."""
    if weights == "packed" and not pack_linear_weights(net):
        pytest.skip("no oneDNN weight packing for this torch build / dtype")
    return net


@pytest.fixture(params=WEIGHTS)
def weights(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is fastest, and immune to OpenMP oversubscription slowdowns
    on a busy machine (2 threads were up to 5x slower than 1 here under load). Use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_schedule(decoder, ctx, masked: torch.Tensor):
    """Drive ``decoder.plan`` over all its steps, unmasking the leftmost n masked positions of each
    step's window; returns the plans and what is left masked."""
    decoder.check(ctx.gen_length)
    decoder.start(ctx)
    masked = masked.clone()
    plans = []
    for step in range(decoder.steps):
        plan = decoder.plan(step, masked)
        plans.append(plan)
        lo, hi = plan.window
        for row, n in enumerate(plan.n_transfer.tolist()):
            candidates = masked[row, lo:hi].nonzero().flatten()[:n] + lo
            assert len(candidates) == n, f"step {step}: row {row} asked for {n} tokens"
            masked[row, candidates] = False
    assert decoder.plan(decoder.steps, masked) is None
    return plans, masked


class Recorder(CacheMethod):
    """Wraps a cache method and records what it saw, asked for and was told, step by step."""

    def __init__(self, inner: CacheMethod) -> None:
        self.inner = inner
        self.name = inner.name
        self.needs_attention = inner.needs_attention
        self.steps: list[dict] = []

    def check(self, decoder) -> None:
        self.inner.check(decoder)

    def start(self, ctx) -> None:
        super().start(ctx)
        self.inner.start(ctx)
        self.steps = []

    def select(self, view: StepView) -> ActiveRequest:
        request = self.inner.select(view)
        self.steps.append(dict(
            masked=view.masked.clone(), plan=view.plan, full=request.full, request=request,
            scheduled=None if view.plan.scheduled is None else view.plan.scheduled.clone(),
        ))
        return request

    def observe(self, view: StepView, outcome: StepOutcome) -> None:
        rec = self.steps[-1]
        rec.update(active=outcome.active.clone(), transferred=outcome.transferred.clone(),
                   confidence=outcome.confidence.clone(),
                   remasked=None if outcome.remasked is None else outcome.remasked.clone())
        if hasattr(self.inner, "confidence"):
            rec["cache_conf_before"] = self.inner.confidence.clone()
        self.inner.observe(view, outcome)
        if hasattr(self.inner, "confidence"):
            rec["cache_conf_after"] = self.inner.confidence.clone()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention mask) of prompts left-padded to the longest, as the HF models take them."""
    width = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return tokens, mask


def assert_causal_matches(net: Transformer, hf, prompts: list[list[int]]) -> None:
    """``net`` run causally on the left-padded prompts gives transformers' logits at every real position."""
    tokens, mask = left_padded(prompts, net.args.pad_token_id)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = net(tokens, attention_mask=mask, causal=True)
        theirs = hf(input_ids=tokens, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def float64_reference(net: Transformer, tokens: torch.Tensor, attention_mask: torch.Tensor,
                      block_length: int | None = None) -> torch.Tensor:
    """Bidirectional logits from scratch in float64 (RMSNorm, RoPE rotate-half, masked softmax, SwiGLU),
    with per-head QK RMSNorm before RoPE where the net has it, and an MoE FFN as a dense mixture (every
    expert on every row, weighted by the top-k routing probabilities, 0 elsewhere). ``block_length``:
    block-causal instead (block diffusion): a token sees its own block of ``block_length`` real tokens,
    counted from the row's first, and the earlier blocks."""
    a = net.args
    w = {k: v.double() for k, v in net.state_dict().items()}
    B, T = tokens.shape
    hd, H, Hkv = a.head_dim, a.n_heads, a.n_kv_heads

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps)

    def linear(x, prefix):
        y = x @ w[prefix + ".weight"].T
        return y + w[prefix + ".bias"] if prefix + ".bias" in w else y

    def swiglu(x, prefix):
        gate, up = linear(x, f"{prefix}.w_gate"), linear(x, f"{prefix}.w_up")
        return linear(gate * torch.sigmoid(gate) * up, f"{prefix}.w_down")

    pos = (attention_mask.cumsum(1) - 1).clamp(min=0).double()  # RoPE counts real tokens only
    inv_freq = a.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.cat([pos[..., None] * inv_freq] * 2, -1)[:, None]  # (B, 1, T, hd)
    cos, sin = angle.cos(), angle.sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padded keys are never attended
    if block_length is not None:
        block = pos.long() // block_length  # (B, T)
        keep = keep & (block[:, None, :, None] >= block[:, None, None, :])  # (B, 1, T queries, T keys)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(a.n_layers):
        p = f"layers.{i}"
        x = rms(h, w[f"{p}.attn_norm.weight"])
        q = linear(x, f"{p}.attn.wq").view(B, T, H, hd)
        k = linear(x, f"{p}.attn.wk").view(B, T, Hkv, hd)
        v = linear(x, f"{p}.attn.wv").view(B, T, Hkv, hd).transpose(1, 2)
        if f"{p}.attn.q_norm.weight" in w:
            q, k = rms(q, w[f"{p}.attn.q_norm.weight"]), rms(k, w[f"{p}.attn.k_norm.weight"])
        q, k = rope(q.transpose(1, 2)), rope(k.transpose(1, 2))
        group = torch.arange(H) // (H // Hkv)  # query head h reads KV head h // (H / Hkv)
        k, v = k[:, group], v[:, group]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        h = h + linear((probs @ v).transpose(1, 2).reshape(B, T, H * hd), f"{p}.attn.wo")
        x = rms(h, w[f"{p}.ffn_norm.weight"])
        if f"{p}.ffn.router.weight" in w:
            route = linear(x, f"{p}.ffn.router").softmax(-1)
            top = route.topk(a.n_experts_per_token, dim=-1)
            gates = torch.zeros_like(route).scatter(-1, top.indices, top.values)  # (B, T, E)
            experts = torch.stack([swiglu(x, f"{p}.ffn.experts.{e}") for e in range(a.n_experts)])
            h = h + torch.einsum("bte,ebtd->btd", gates, experts)
        else:
            h = h + swiglu(x, f"{p}.ffn")
    return linear(rms(h, w["norm.weight"]), "output")


def edited_config(checkpoint: Path, tmp_path: Path, **fields) -> Path:
    """A copy of a checkpoint folder whose config.json has ``fields`` set."""
    import json
    import shutil

    folder = Path(shutil.copytree(checkpoint, tmp_path / "edited"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def drawn_figures(tmp_path, monkeypatch) -> dict:
    """scripts/plot.py's figures by name, as its main() saves them (and still writes them)."""
    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    drawn, save = {}, plot.save

    def keep(fig, out, name):
        drawn[name] = fig
        return save(fig, out, name)

    monkeypatch.setattr(plot, "save", keep)
    return drawn
