"""Prompt encoding (chat template for instruct models) and response decoding (cut at EOS)."""
from __future__ import annotations

import warnings
from pathlib import Path

from torch import Tensor

from .transformer import ModelArgs

# End-of-turn tokens that end a response besides the model's eos (LLaDA <|eot_id|>, Qwen <|im_end|>,
# LLaDA-MoE <|role_end|>).
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|role_end|>")


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json and warns that model_type llada/Dream is unknown to it;
    # the tokenizer itself is fully described by tokenizer.json, so the warning is noise.
    # Likewise its FutureWarning about the rope_scaling field LLaDA-MoE's config.json carries.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError, ValueError or the tokenizers library's bare Exception, many lines long
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"the checkpoint folder {folder} has no usable tokenizer (the tokenizer files "
                         f"published with its weights, e.g. tokenizer.json): {reason}") from err
    finally:
        hf_logging.set_verbosity(verbosity)


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def stop_token_ids(tokenizer, args: ModelArgs) -> set[int]:
    ids = {args.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids


def useful_lengths(tokens: Tensor, stop_ids: set[int]) -> list[int]:
    """Per row: tokens up to and including the first stop token (all of them if none)."""
    lengths = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
        lengths.append(len(row) if cut is None else cut + 1)
    return lengths


def decode_responses(tokenizer, tokens: Tensor, stop_ids: set[int]) -> tuple[list[str], list[int]]:
    """Texts cut before the first stop token, and the useful token count of each row."""
    lengths = useful_lengths(tokens, stop_ids)
    texts = []
    for row, n in zip(tokens.tolist(), lengths):
        kept = row[:n]
        if kept and kept[-1] in stop_ids:
            kept = kept[:-1]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts, lengths
