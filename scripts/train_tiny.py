"""Train a tiny LLaDA-, Dream- or SDAR-architecture diffusion LM on CPU (the embedded default models).

    python scripts/train_tiny.py --family llada --out assets/tiny_llada
    python scripts/train_tiny.py --family dream --out assets/tiny_dream
    python scripts/train_tiny.py --family sdar --block-length 4 --steps 1500 --out assets/tiny_sdar

Data: the synthetic GSM8K-style word problems of :mod:`dllm.eval.arith_data` (train split only;
the held-out test split is disjoint by construction). Each example is the *chat-templated*
prompt ("Question: ...\\nAnswer:" as a user turn, exactly what lm-eval sends an instruct model)
followed by the worked answer and EOS padding up to ``--gen-length`` tokens, as in LLaDA's SFT,
so at inference the model fills the tail of a 64-token response with EOS.

Objective (LLaDA SFT): per sequence t ~ U(eps, 1] (stratified over the batch), every answer token
(EOS padding included) is masked with probability t, the prompt never; loss = cross-entropy on
the masked answer tokens weighted by 1/t, normalised by the answer length. Dream is trained with
shifted logits: the prediction for position j comes from the hidden state at j - 1.

Block diffusion (SDAR, block-causal attention over blocks of ``--block-length`` counted from each
sequence's first token): SDAR's objective. The noisy copy x_t and the clean x_0 are fed side by
side with the same positions; a noisy block attends to itself and to the clean earlier blocks, the
clean copy block-causally to itself (so one forward trains every block given its clean prefix, as
the blocks are decoded); the loss is as above on the masked answer tokens of the noisy copy.

Deterministic: seeded data, initialisation and masking, a fixed thread count and
``torch.use_deterministic_algorithms``; CPU only. Writes the checkpoint in the family's real
on-disk format (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json) plus training.json and loss.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from dllm.decoding.layout import lay_out  # noqa: E402
from dllm.eval import arith_data  # noqa: E402
from dllm.models.loading import save_checkpoint  # noqa: E402
from dllm.models.tiny import CORPUS, SPLIT_PATTERN, SPLIT_PATTERN_LLAMA3, build_tokenizer, tiny_model_args, write_tokenizer_files  # noqa: E402
from dllm.models.transformer import ModelArgs, Transformer  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Role words of both chat templates, so the BPE learns them as single tokens.
TEMPLATE_TEXT = "system\nuser\nassistant\nYou are a helpful assistant.\nQuestion:\nAnswer:\n"


@dataclass
class TrainConfig:
    family: str
    out: str
    seed: int = 0
    steps: int = 2300
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 60
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eps: float = 1e-3  # t ~ U(eps, 1]
    gen_length: int = 64  # answer + EOS padding
    full_pad_prob: float = 0.25  # < 1: that share of batches padded to gen_length, the others
    # (answer-length-grouped) to their answer length + 1-4 EOS, which saves compute
    train_size: int = 40000  # distinct training problems drawn from the train split
    bpe_vocab: int = 512
    numbers: str = "grouped"  # grouped: LLaMA-3's up-to-3-digit number tokens | digits: Qwen2's single digits
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 320
    threads: int = 1
    save_dtype: str = "bfloat16"
    eval_n: int = 200  # held-out problems scored at the end (0: skip)
    eval_batch: int = 50
    max_value: int = arith_data.MAX_VALUE
    max_ops: int = 3
    init_std: float = 0.0  # 0: 1/sqrt(fan_in) per matrix; > 0: normal(0, init_std) everywhere
    block_length: int = 4  # block-diffusion families: the attention block (SDAR: 4)
    head_init_from_embedding: bool = False  # LM head starts as a copy of the embedding (untied)

    def shape(self) -> dict:
        return dict(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim)


# ----------------------------------------------------------------------------- data
def train_problems(cfg: TrainConfig) -> list[arith_data.Problem]:
    return arith_data.make_split("train", cfg.train_size, cfg.seed, max_value=cfg.max_value, max_ops=cfg.max_ops)


def make_tokenizer(cfg: TrainConfig, problems: list[arith_data.Problem], out: Path):
    """Byte-level BPE (tiny.py's, same pre-tokenizer and specials) learnt from the training text;
    writes the tokenizer files into ``out`` and returns (transformers tokenizer, special ids, raw)."""
    from dllm.models.tokenization import load_tokenizer

    text = "".join(f"{arith_data.prompt_text(p.question)}\n{p.answer}\n" for p in problems[:4000])
    split = {"grouped": SPLIT_PATTERN_LLAMA3, "digits": SPLIT_PATTERN}[cfg.numbers]
    tok = build_tokenizer(cfg.family, CORPUS + TEMPLATE_TEXT * 20 + text, cfg.bpe_vocab, split)
    ids = write_tokenizer_files(cfg.family, tok, out)
    return load_tokenizer(out), ids, tok


def chat_prompts(hf_tok, questions: list[str]) -> list[list[int]]:
    """The prompt ids an instruct model sees at evaluation (chat template, generation prompt)."""
    from dllm.models.tokenization import encode_prompts

    return encode_prompts(hf_tok, [arith_data.prompt_text(q) for q in questions], chat=True)


def encode(hf_tok, problems, gen_length: int, eos: int) -> tuple[list[list[int]], torch.Tensor]:
    prompts = chat_prompts(hf_tok, [p.question for p in problems])
    answers = hf_tok([p.answer for p in problems], add_special_tokens=False)["input_ids"]
    too_long = max(len(a) for a in answers)
    if too_long > gen_length:
        raise ValueError(f"an answer has {too_long} tokens > gen_length={gen_length}")
    padded = torch.full((len(answers), gen_length), eos, dtype=torch.long)
    for i, a in enumerate(answers):
        padded[i, : len(a)] = torch.tensor(a)
    return prompts, padded


def make_batch(prompts: list[list[int]], answers: torch.Tensor, idx: list[int], args: ModelArgs, G: int | None = None):
    """x0 (B, P+G) with left-padded prompts (answers cut to G columns), real (B, P+G) bool, and P:
    the generation loop's own padding, with the answers where it puts the masks."""
    G = G or answers.shape[1]
    layout = lay_out([prompts[i] for i in idx], G, args.mask_token_id, args.pad_token_id, "cpu")
    x0, real = layout.x, layout.real
    x0[:, -G:] = answers[idx, :G]
    return x0, real, x0.shape[1] - G


# ----------------------------------------------------------------------------- objective
def block_diffusion_hidden(net: Transformer, xt, x0, real, positions, block: int):
    """Hidden states of the noisy copy, fed beside the clean one (SDAR's training masks)."""
    rank = positions // block
    q, k = rank[:, :, None], rank[:, None, :]
    keys = real[:, None, :]
    noisy_rows = torch.cat([(q == k) & keys, (k < q) & keys], 2)  # noisy keys | clean keys
    clean_rows = torch.cat([torch.zeros_like(noisy_rows[..., : xt.shape[1]]), (k <= q) & keys], 2)
    mask = torch.cat([noisy_rows, clean_rows], 1)[:, None]
    hidden, _ = net.hidden(torch.cat([xt, x0], 1), torch.cat([positions, positions], 1), mask)
    return hidden[:, : xt.shape[1]]


def diffusion_loss(net: Transformer, x0, real, P: int, gen: torch.Generator, eps: float, block: int = 0):
    """LLaDA SFT loss of one batch (prompt never masked, answer tokens masked with prob t); for a
    block-diffusion model (``block``: its attention block) SDAR's side-by-side variant."""
    B, T = x0.shape
    G = T - P
    # Stratified t over the batch: each t is marginally U(eps, 1], the batch covers the range.
    u = (torch.arange(B, dtype=torch.float32) + torch.rand(B, generator=gen)) / B
    u = u[torch.randperm(B, generator=gen)]
    t = eps + (1 - eps) * u
    masked = torch.rand(B, G, generator=gen) < t[:, None]
    xt = x0.clone()
    xt[:, P:] = torch.where(masked, net.args.mask_token_id, x0[:, P:])
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    if net.args.block_causal:
        hidden = block_diffusion_hidden(net, xt, x0, real, positions, block)
    else:
        hidden, _ = net.hidden(xt, positions, real[:, None, None, :])
    s = net.args.logit_shift  # Dream: position j is predicted from hidden j - 1
    logits = net.output(hidden[:, P - s : T - s])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x0[:, P:].reshape(-1), reduction="none")
    ce = ce.view(B, G) * masked / t[:, None]
    return ce.sum() / (B * G)


def init_weights(net: Transformer, seed: int, std: float) -> None:
    """Seeded init in parameter-name order: norms 1, biases 0, matrices normal(0, std) or, with
    std = 0, normal(0, 1/sqrt(fan_in)) (embeddings: 1/sqrt(dim))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                scale = std or 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def draw_batch(cfg: TrainConfig, lengths: list[int], by_length: dict[int, list[int]], gen: torch.Generator) -> tuple[list[int], int]:
    """Batch indices and answer-region width: uniform and gen_length (LLaDA's fixed padding), or,
    with probability 1 - full_pad_prob, examples of one answer length padded with 1-4 EOS.
    ``lengths``: answer length of every example; ``by_length``: the examples of each length."""
    if cfg.full_pad_prob >= 1 or float(torch.rand(1, generator=gen)) < cfg.full_pad_prob:
        return torch.randint(len(lengths), (cfg.batch_size,), generator=gen).tolist(), cfg.gen_length
    n = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
    pool = by_length[n]
    idx = [pool[int(j)] for j in torch.randint(len(pool), (cfg.batch_size,), generator=gen)]
    return idx, min(cfg.gen_length, n + 1 + int(torch.randint(4, (1,), generator=gen)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def set_determinism(cfg: TrainConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)


def train(cfg: TrainConfig, progress: bool = True, on_step=None) -> dict:
    """Train and save into cfg.out; returns a summary (losses, timings, the model, the tokenizer)."""
    if cfg.family not in ("llada", "dream", "sdar"):
        raise ValueError(f"family={cfg.family!r} (allowed: llada, dream, sdar)")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    set_determinism(cfg)
    # Written into a staging folder beside cfg.out and moved there whole at the end: a setting found
    # impossible on the way (an answer longer than gen_length in this vocabulary) or a killed run
    # leaves cfg.out as it was, never a new tokenizer beside old weights.
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = _train(replace(cfg, out=str(staging)), progress, on_step)
        out.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
        return result
    finally:  # callers in the same process (tests) get their settings back
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, progress: bool, on_step=None) -> dict:
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = train_problems(cfg)
    hf_tok, ids, tok = make_tokenizer(cfg, problems, out)
    args = tiny_model_args(cfg.family, tok, ids, **cfg.shape())
    if args.block_causal:  # config.json records the block it was trained with (SDAR's block_size)
        args = replace(args, trained_block_length=cfg.block_length)
    prompts, answers = encode(hf_tok, problems, cfg.gen_length, args.eos_token_id)

    lengths = (answers != args.eos_token_id).sum(1).tolist()
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)

    net = Transformer(args)
    init_weights(net, cfg.seed, cfg.init_std)
    if cfg.head_init_from_embedding:
        with torch.no_grad():
            net.output.weight.copy_(net.tok_embeddings.weight)
    net.train()
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train tiny {cfg.family}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx, G = draw_batch(cfg, lengths, by_length, gen)
        x0, real, P = make_batch(prompts, answers, idx, args, G)
        loss = diffusion_loss(net, x0, real, P, gen, cfg.eps, cfg.block_length)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:  # experiments: on_step(step, net, tokenizer)
            on_step(step, net, hf_tok)
        if step % 10 == 0 or step == cfg.steps - 1:
            window = losses[-50:]
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lr_at(step, cfg):.2e}")
    bar.close()
    train_seconds = time.perf_counter() - start
    net.eval().requires_grad_(False)
    save_checkpoint(net.to(DTYPES[cfg.save_dtype]), out)
    net.float()
    return {
        "losses": losses,
        "train_seconds": train_seconds,
        "net": net,
        "tokenizer": hf_tok,
        "n_params": sum(p.numel() for p in net.parameters()),
        "n_train_problems": len(problems),
    }


# ----------------------------------------------------------------------------- evaluation
def evaluate(net: Transformer, hf_tok, docs: list[dict], gen_length: int = 64, block_length: int = 32,
             batch_size: int = 50, progress: bool = True) -> dict:
    """Greedy low-confidence decoding (one token per step), cache=none; GSM8K-style scoring. A
    block-diffusion model: its own decoder, static, one token per step in blocks of block_length."""
    from tqdm import tqdm

    from dllm.cache.base import build_cache
    from dllm.decoding.base import build_decoder
    from dllm.decoding.loop import generate
    from dllm.models.tokenization import decode_responses, stop_token_ids

    if net.args.block_causal:
        decoder = build_decoder("block_diffusion", block_length=block_length, steps=block_length, remasking="static")
    else:
        decoder = build_decoder("low_confidence", steps=gen_length, block_length=block_length, temperature=0.0)
    cache = build_cache("none")
    stops = stop_token_ids(hf_tok, net.args)
    prompts = chat_prompts(hf_tok, [d["question"] for d in docs])
    texts: list[str] = []
    for s in tqdm(range(0, len(docs), batch_size), desc="eval", disable=not progress):
        out = generate(net, prompts[s : s + batch_size], decoder, cache, gen_length)
        texts += decode_responses(hf_tok, out.tokens, stops)[0]
    strict = [arith_data.is_correct(t, d["answer"], strict=True) for t, d in zip(texts, docs)]
    flexible = [arith_data.is_correct(t, d["answer"]) for t, d in zip(texts, docs)]
    return {
        "n": len(docs),
        "strict_match": sum(strict) / len(docs),
        "flexible_extract": sum(flexible) / len(docs),
        "generations": texts,
    }


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 25
    smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, lw=0.8, label="per step")
    ax.plot(smooth, lw=1.5, label=f"mean of last {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig(family="llada", out="")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=["llada", "dream", "sdar"])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    for name, value in asdict(defaults).items():
        if name in ("family", "out"):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "save_dtype":
            parser.add_argument(flag, default=value, choices=sorted(DTYPES))
        elif isinstance(value, bool):
            parser.add_argument(flag, type=str.lower, choices=["true", "false"], default=str(value).lower())
        elif name == "numbers":
            parser.add_argument(flag, default=value, choices=["grouped", "digits"])
        else:
            parser.add_argument(flag, type=type(value), default=value)
    values = vars(parser.parse_args(argv))
    values.update({name: values[name] == "true" for name, value in asdict(defaults).items() if isinstance(value, bool)})
    cfg = TrainConfig(**values)
    if problem := config_problem(cfg):
        parser.error(problem)
    return cfg


# Settings that must be positive, at least 0, or in [0, 1]; the rest are checked by hand below.
POSITIVE = ("steps", "batch_size", "lr", "gen_length", "train_size", "bpe_vocab", "dim", "n_layers", "n_heads",
            "n_kv_heads", "ffn_dim", "threads", "eval_batch", "max_value", "max_ops", "block_length")
NON_NEGATIVE = ("seed", "warmup", "weight_decay", "grad_clip", "eval_n", "init_std")
FRACTIONS = ("min_lr_ratio", "full_pad_prob")


def config_problem(cfg: TrainConfig) -> str | None:
    """What is wrong with ``cfg`` (one message naming the setting), or None, before training starts."""
    for name in POSITIVE:
        if not getattr(cfg, name) > 0:
            return f"--{name.replace('_', '-')}={getattr(cfg, name)} must be > 0"
    for name in NON_NEGATIVE:
        if not getattr(cfg, name) >= 0:
            return f"--{name.replace('_', '-')}={getattr(cfg, name)} must be >= 0"
    for name in FRACTIONS:
        if not 0 <= getattr(cfg, name) <= 1:
            return f"--{name.replace('_', '-')}={getattr(cfg, name)} must be in [0, 1]"
    if not 0 < cfg.eps < 1:
        return f"--eps={cfg.eps} must be in (0, 1)"
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        return (f"--dim={cfg.dim}, --n-heads={cfg.n_heads}, --n-kv-heads={cfg.n_kv_heads}: dim must be a multiple of "
                "n_heads, and n_heads of n_kv_heads")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        return f"--out={cfg.out} is a file, not a folder"
    return None


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)  # the final evaluation too
    command = "python scripts/train_tiny.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        result = train(cfg)
    except ValueError as err:  # a setting that proves impossible once the tokenizer is learnt
        print(f"train_tiny.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(cfg.out)
    final = sum(result["losses"][-50:]) / len(result["losses"][-50:])
    plot_losses(result["losses"], out / "loss.png", f"tiny {cfg.family}: {cfg.steps} steps x {cfg.batch_size}")
    summary = {
        "command": command,
        "family": cfg.family,
        "seed": cfg.seed,
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "n_params": result["n_params"],
        "data": {
            "generator": "dllm.eval.arith_data (train split)",
            "train_problems": result["n_train_problems"],
            "examples_seen": cfg.steps * cfg.batch_size,
        },
        "steps": cfg.steps,
        "final_loss": round(final, 4),
        "final_loss_note": "mean of the last 50 steps' batch losses",
        "last_step_loss": round(result["losses"][-1], 4),
        "train_seconds": round(result["train_seconds"], 1),
        "torch": torch.__version__,
        "weights_dtype": cfg.save_dtype,
    }
    if cfg.eval_n:
        # Score the saved weights (bf16-rounded when saved in bf16), as run.py will load them.
        from dllm.models.loading import load_model

        net = load_model(str(out), "cpu", torch.float32, expected_family=cfg.family)
        docs = arith_data.load_test()[: cfg.eval_n]
        block = cfg.block_length if net.args.block_causal else 32
        ev = evaluate(net, result["tokenizer"], docs, cfg.gen_length, block, batch_size=cfg.eval_batch)
        summary["heldout"] = {
            "n": ev["n"], "file": "dllm/eval/tasks/arith/data/arith_test.jsonl (first n)",
            "decoding": (f"block_diffusion static, greedy, gen_length {cfg.gen_length}, block_length {block}, one token "
                         "per step, cache=none") if net.args.block_causal else
                        f"low_confidence, greedy, gen_length {cfg.gen_length}, block_length 32, {cfg.gen_length} steps, "
                        "cache=none",
            "strict_match": ev["strict_match"], "flexible_extract": ev["flexible_extract"],
        }
        for d, g in list(zip(docs, ev["generations"]))[:3]:
            print(f"\n>>> {d['question']}\n{g}")
        print(f"\nheld-out accuracy: strict {ev['strict_match']:.3f}, flexible {ev['flexible_extract']:.3f} (n={ev['n']})")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"final loss {summary['final_loss']}, {summary['train_seconds']} s; wrote {out}")
    return summary


if __name__ == "__main__":
    main()
