"""Tiny random LLaDA / Dream / LLaDA-MoE / SDAR / Fast-dLLM v2 checkpoints in the exact on-disk format of
the published ones.

A folder holds config.json (the family's real field names), model.safetensors (or shards plus
model.safetensors.index.json) with the real key names, and a byte-level BPE tokenizer
(tokenizer.json, tokenizer_config.json with the family's chat template, special_tokens_map.json)
that ``transformers.AutoTokenizer`` loads offline. Every test and smoke run uses these, so the
whole pipeline (hub folder -> loader -> tokenizer -> decoding) runs on CPU without downloads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dllm.atomic import creation_refused, file_in_the_way

from .loading import save_checkpoint
from .transformer import ModelArgs, Transformer

# Bump when the folder layout or contents change, so stale caches are not reused (and the runs
# recorded on them are not resumed: the version is in their checkpoint identity).
CACHE_VERSION = "v1"

# Qwen2's pre-tokenizer split (LLaMA-3 is the same up to digit grouping): single digits keep
# arithmetic tokenisation simple, and byte-level BPE round-trips any text exactly.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# LLaMA-3's split: numbers in groups of up to three digits (one token each for small numbers).
SPLIT_PATTERN_LLAMA3 = SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
BPE_VOCAB = 512  # 256 byte symbols + merges learnt from CORPUS; special tokens come after.

CORPUS = """\
Q: Tom has 3 apples. He buys 2 more apples at the store. How many apples does he have now?
A: Tom starts with 3 apples and buys 2 more, so he has 3 + 2 = 5 apples. #### 5
Q: A train travels 60 miles per hour for 2 hours. How far does it go?
A: The distance is speed times time: 60 * 2 = 120 miles. #### 120
Q: Sarah had 12 cookies and gave 4 of them to her friend. How many cookies are left?
A: She has 12 - 4 = 8 cookies left. #### 8
Question: What is the sum of 17 and 25? Answer: 17 + 25 = 42. The answer is 42.
Let's think step by step. First we compute the total cost, then we divide by the number of people.
The quick brown fox jumps over the lazy dog. A small model is enough to test the whole pipeline.
1+1=2, 2+3=5, 7*8=56, 100-58=42, 81/9=9, (4+6)*3=30, 0.5 + 0.25 = 0.75.
def add(a, b):
    return a + b
The user asks a question and the assistant gives a helpful answer with the final result.
There are 24 hours in a day, 7 days in a week, and 365 days in a year.
If each box holds 6 eggs, then 4 boxes hold 4 * 6 = 24 eggs in total.
"""

# Special tokens in the order of their real ids; the first is bos for LLaDA and eos for Dream.
SPECIALS = {
    "llada": [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|mdm_mask|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
    # LLaDA-MoE's ids 156892 (<|endoftext|>, eos = pad) and 156895 (<|mask|>), in that order; its
    # chat markup uses <role>...</role> and <|role_end|>.
    "llada_moe": ["<|endoftext|>", "<role>", "</role>", "<|mask|>", "<|role_end|>"],
    # Qwen's 151643 / 151644 / 151645, then the mask: SDAR's <|MASK|> 151669, Fast-dLLM v2's |<MASK>| 151665.
    "sdar": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"],
    "fast_dllm_v2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"],
    # LLaDA2.0's 156891 (<|startoftext|>, not added to prompts), 156892 (<|endoftext|>, eos = pad) and
    # 156895 (<|mask|>), in that order; its chat markup's <role>, </role>, <|role_end|> (real ids not read).
    "llada2": ["<|startoftext|>", "<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"],
}
MASK_TOKEN = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "llada_moe": "<|mask|>", "sdar": "<|MASK|>",
              "fast_dllm_v2": "|<MASK>|", "llada2": "<|mask|>"}
# The tokenizer's eos_token where it is not <|endoftext|> (Fast-dLLM v2's is <|im_end|>; pad stays <|endoftext|>).
TOKENIZER_EOS = {"fast_dllm_v2": "<|im_end|>"}
# ModelArgs.eos_token_id, the token a generation stops on, where it is not <|endoftext|>: the chat turn's
# end for the block-diffusion chat models (see dllm.models.sdar / fast_dllm_v2).
STOP_TOKEN = {"sdar": "<|im_end|>", "fast_dllm_v2": "<|im_end|>"}

CHAT_TEMPLATE = {
    # LLaDA-8B-Instruct ships the LLaMA-3 template.
    "llada": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Dream ships Qwen2's template with the default system prompt.
    "dream": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # LLaDA-MoE's prompt format (<role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>), written here
    # from the format its users and dInfer feed the model; the published template text itself was not
    # read, so a real checkpoint's own tokenizer_config.json is what runs for it.
    "llada_moe": (
        "{% for message in messages %}{% set role = 'HUMAN' if message['role'] == 'user' else message['role'] | upper %}"
        "{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
    ),
    # SDAR / TraDo ship Qwen3's template: no default system prompt, and an empty think block only when
    # enable_thinking=false is passed (tool calls and reasoning_content are left out here).
    "sdar": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{% endif %}"
    ),
}
# Fast-dLLM v2 ships Qwen2.5's ChatML template with Dream's default system prompt ("You are a helpful
# assistant.", not Qwen2.5-Instruct's "You are Qwen, created by Alibaba Cloud. ...").
CHAT_TEMPLATE["fast_dllm_v2"] = CHAT_TEMPLATE["dream"]
# LLaDA2.0: the Ling-2.0 template (a SYSTEM turn that always ends "detailed thinking off", HUMAN /
# ASSISTANT turns closed by <|role_end|>) without its tool and reasoning branches; dInfer's and
# dFactory's prompts have this form. That the LLaDA2.0 tokenizer ships it is assumed, not read.
CHAT_TEMPLATE["llada2"] = (
    "{{ '<role>SYSTEM</role>' }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n' }}"
    "{% endif %}{{ 'detailed thinking off<|role_end|>' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<role>HUMAN</role>' + message['content'] + '<|role_end|>' }}"
    "{% elif message['role'] == 'system' and not loop.first %}"
    "{{ '<role>SYSTEM</role>' + message['content'] + '<|role_end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<role>ASSISTANT</role>' + message['content'] + '<|role_end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)

# generation_config.json of Dream-org/Dream-v0-Instruct-7B (transformers 4.46.2) but its special
# ids (151643 there), which write_generation_config sets from the tiny tokenizer.
DREAM_GENERATION_CONFIG = {
    "_from_model_config": True,
    "alg": "origin",
    "alg_temp": None,
    "eps": 0.001,
    "mask_token_id": None,
    "output_history": False,
    "steps": 512,
    "temperature": 0.0,
    "top_k": None,
    "top_p": None,
    "transformers_version": "4.46.2",
}
# generation_config.json of SDAR-4B/8B-Chat and Fast_dLLM_v2_7B but their special ids: Qwen's sampling
# defaults (which their diffusion generation ignores) and the stop list [<|im_end|>, <|endoftext|>], set
# from the tiny tokenizer by write_generation_config.
QWEN_GENERATION_CONFIG = {
    "sdar": {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
    "fast_dllm_v2": {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8},
}

# Real architecture constants of each family; only the sizes are shrunk.
BASE_ARGS = {
    "llada": dict(rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False, max_seq_len=4096, logit_shift=0),
    "dream": dict(rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, max_seq_len=131072, logit_shift=1),
    "llada_moe": dict(rope_theta=50000.0, norm_eps=1e-5, qkv_bias=False, max_seq_len=8192, logit_shift=0,
                      qk_norm=True),
    "sdar": dict(rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=False, max_seq_len=32768, logit_shift=0,
                 qk_norm=True, block_causal=True, trained_block_length=4),
    "fast_dllm_v2": dict(rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, max_seq_len=32768, logit_shift=1,
                         block_causal=True, trained_block_length=32),
    "llada2": dict(rope_theta=600000.0, norm_eps=1e-6, qkv_bias=False, max_seq_len=32768, logit_shift=0,
                   qk_norm=True, block_causal=True, trained_block_length=32, router_score="sigmoid",
                   norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1, n_dense_layers=1),
}
DEFAULT_SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
# LLaDA-MoE: 8 narrow experts, 2 per token (the real one: 64 experts of 1024, 8 per token, d 2048).
FAMILY_SHAPE = {"llada_moe": dict(ffn_dim=32, n_experts=8, n_experts_per_token=2),
                # SDAR: config.json's head_dim, wider than dim / n_heads, as in SDAR-4B (128 > 2560 / 32).
                "sdar": dict(explicit_head_dim=32),
                # LLaDA2.0: a dense first layer, then 16 experts of 16 in 4 groups (2 kept), 4 per token, a
                # shared one; half of each head rotated (the real mini: 256 of 512 in 8 groups, 4 kept, top 8).
                "llada2": dict(ffn_dim=16, dense_ffn_dim=128, n_experts=16, n_experts_per_token=4, n_expert_groups=4,
                               topk_expert_groups=2, explicit_head_dim=16, explicit_rotary_dim=8)}
SHAPE_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len",
                "n_experts", "n_experts_per_token"}


def build_tokenizer(
    family: str, corpus: str = CORPUS, vocab_size: int = BPE_VOCAB, split_pattern: str = SPLIT_PATTERN
) -> Tokenizer:
    """Byte-level BPE learnt from ``corpus`` (deterministic), then the family's special tokens.

    The random checkpoints use CORPUS; the trained ones (scripts/train_tiny.py) add their
    training text so that words are single tokens and sequences stay short.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    tok.add_special_tokens(SPECIALS[family])
    return tok


def write_generation_config(family: str, ids: dict[str, int], out: Path) -> Path | None:
    """Dream: write generation_config.json as Dream-v0-Instruct-7B publishes it, with this
    tokenizer's special ids; Dream's own loading code (``DreamModel.from_pretrained``) reads it and
    fails without it. Its mask id is null as published (Dream's generation code takes the mask id
    from config.json). SDAR / Fast-dLLM v2: as published (SDAR's generate.py stops on its eos list).
    LLaDA: nothing (LLaDA's loading code does not need the file)."""
    eos = ids["<|endoftext|>"]
    if family == "dream":
        config = {**DREAM_GENERATION_CONFIG, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    elif family in QWEN_GENERATION_CONFIG:
        config = {**QWEN_GENERATION_CONFIG[family], "bos_token_id": eos, "eos_token_id": [ids["<|im_end|>"], eos],
                  "pad_token_id": eos}
    else:
        return None
    path = out / "generation_config.json"
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    return path


def write_tokenizer_files(family: str, tok: Tokenizer, out: Path) -> dict[str, int]:
    """Write the files that carry the special ids: tokenizer.json / tokenizer_config.json /
    special_tokens_map.json (and Dream's generation_config.json); return the special ids."""
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS[family]}
    roles = {"eos_token": TOKENIZER_EOS.get(family, "<|endoftext|>"), "pad_token": "<|endoftext|>",
             "mask_token": MASK_TOKEN[family]}
    if family == "llada":
        roles["bos_token"] = "<|startoftext|>"
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": BASE_ARGS[family]["max_seq_len"],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in ids.items()
        },
        "additional_special_tokens": [t for t in SPECIALS[family] if t not in roles.values()],
        **roles,
        "chat_template": CHAT_TEMPLATE[family],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {**roles, "additional_special_tokens": config["additional_special_tokens"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    write_generation_config(family, ids, out)
    return ids


def tiny_model_args(family: str, tok: Tokenizer, ids: dict[str, int], **shape: int) -> ModelArgs:
    """ModelArgs of a tiny ``family`` model over tokenizer ``tok`` (special ``ids`` as written by
    :func:`write_tokenizer_files`); ``shape`` overrides DEFAULT_SHAPE and may set vocab_size."""
    unknown = set(shape) - SHAPE_FIELDS
    if unknown:
        raise TypeError(f"unknown shape fields {sorted(unknown)} (allowed: {sorted(SHAPE_FIELDS)})")
    shape = dict(shape)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    # Real checkpoints pad the embedding to a multiple of 64 beyond the tokenizer's ids.
    vocab_size = shape.pop("vocab_size", -(-n_tokens // 64) * 64)
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size={vocab_size} does not cover the tokenizer's {n_tokens} ids")
    return ModelArgs(
        family=family,
        vocab_size=vocab_size,
        tie_embeddings=False,
        mask_token_id=ids[MASK_TOKEN[family]],
        eos_token_id=ids[STOP_TOKEN.get(family, "<|endoftext|>")],
        pad_token_id=ids["<|endoftext|>"],
        **{**BASE_ARGS[family], **DEFAULT_SHAPE, **FAMILY_SHAPE.get(family, {}), **shape},
    )


def _init_weights(net: Transformer, seed: int) -> None:
    # normal(0, 0.02) like the published training recipes, norms at 1; parameters are filled in
    # name order from one generator, so the weights depend only on the seed and the shapes.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        # Buffers after the parameters (only LLaDA2.0's expert_bias, non-zero as a trained one is).
        for _, b in sorted(net.named_buffers()):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.02)


def make_tiny_checkpoint(
    family: str,
    out: str | Path,
    seed: int = 0,
    max_shard_bytes: int = 2**30,
    dtype: torch.dtype = torch.bfloat16,
    **shape: int,
) -> Path:
    """Write a random tiny ``family`` (a key of SPECIALS) checkpoint folder and return its path.

    shape overrides DEFAULT_SHAPE (dim, n_layers, n_heads, n_kv_heads, ffn_dim; for llada_moe also
    n_experts, n_experts_per_token, with ffn_dim the width of one expert) and may set
    vocab_size / max_seq_len. Weights are stored in ``dtype`` (bfloat16, like the real ones);
    a small ``max_shard_bytes`` writes the sharded index format.
    """
    if family not in SPECIALS:
        raise ValueError(f"unknown family {family!r} (allowed: {sorted(SPECIALS)})")
    unknown = set(shape) - SHAPE_FIELDS
    if unknown:
        raise TypeError(f"unknown shape fields {sorted(unknown)} (allowed: {sorted(SHAPE_FIELDS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family)
    ids = write_tokenizer_files(family, tok, out)
    net = Transformer(tiny_model_args(family, tok, ids, **shape))
    _init_weights(net, seed)
    save_checkpoint(net.to(dtype), out, max_shard_bytes=max_shard_bytes)
    return out


def _add_generation_config(family: str, folder: Path) -> None:
    """A Dream folder cached before generation_config.json was written gets it (written beside and
    renamed into place, so a concurrent reader sees all or nothing). Our loader never reads the
    file, so a cache this process may not write to is left as it is."""
    if family != "dream" or (folder / "generation_config.json").exists():
        return
    try:
        eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
        tmp = Path(tempfile.mkdtemp(prefix=".generation_config.", dir=folder))
        try:
            os.replace(write_generation_config(family, {"<|endoftext|>": eos}, tmp), folder / "generation_config.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def cache_root(family: str | None = None) -> Path:
    """Where the random-weight tiny checkpoints are built: $DLLM_CACHE, else ~/.cache/dllm-cache-bench.
    ValueError, found before a run loads anything, where that path (or a folder above it) is a file,
    or where ``family``'s checkpoint is still to be built and nothing can be made there."""
    variable = os.environ.get("DLLM_CACHE")
    root = Path(variable or Path.home() / ".cache" / "dllm-cache-bench")
    where = f"$DLLM_CACHE={variable!r}" if variable else f"the tiny models' cache {str(root)!r}"
    if file_in_the_way(root) is not None:
        raise ValueError(f"{where} is, or lies under, a file (allowed: a folder, made if missing)")
    if family is not None and not (root / f"tiny_{family}-{CACHE_VERSION}").is_dir():
        if refused := creation_refused(root):
            raise ValueError(f"{where}: the random-weight {family} checkpoint cannot be built there (nothing can be "
                             f"made in {refused[0]}: {refused[1]}; allowed: a writable folder)")
    return root


def ensure_tiny(family: str, root: Path | None = None) -> Path:
    """The cached default tiny checkpoint of ``family``, built on first use (under :func:`cache_root`
    unless ``root`` is given).

    The folder is built under a temporary name and renamed into place, so a concurrent process
    either sees no folder or a complete one.
    """
    if root is None:
        root = cache_root()
    final = Path(root) / f"tiny_{family}-{CACHE_VERSION}"
    if final.is_dir():
        _add_generation_config(family, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        make_tiny_checkpoint(family, tmp)
        os.rename(tmp, final)
    except OSError:
        # Another process renamed its copy first; theirs is as good as ours.
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
