"""Load original HF checkpoints (config.json + sharded safetensors) into the native Transformer.

Everything that can be wrong with a checkpoint (family, missing/unexpected keys, shapes) is
checked from config.json and the safetensors *headers* before a single weight is read. Weights
are then streamed shard by shard, tensor by tensor, straight into the target dtype and device.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open

from . import dream, fast_dllm_v2, llada, llada2, llada_moe, sdar
from .packed import PackedLinear
from .transformer import ModelArgs, Transformer

# model.family -> the module that reads and writes that family's config.json and key names.
FAMILY_OF_NAME: dict[str, ModuleType] = {"llada": llada, "dream": dream, "llada_moe": llada_moe, "sdar": sdar,
                                          "fast_dllm_v2": fast_dllm_v2, "llada2": llada2}
MODEL_TYPES = sorted({*llada.MODEL_TYPES, dream.MODEL_TYPE, *llada_moe.MODEL_TYPES, sdar.MODEL_TYPE,
                      fast_dllm_v2.MODEL_TYPE, llada2.MODEL_TYPE})
# A family's key_pairs map a checkpoint key to one native key, or to a tuple of native keys when the
# checkpoint stores their tensors fused, concatenated along dim 0 (LLaDA2.0's query_key_value).
Native = str | tuple[str, ...]


def native_keys(native: Native) -> tuple[str, ...]:
    return (native,) if isinstance(native, str) else native


class CheckpointError(ValueError):
    pass


def local_folder(path_or_id: str) -> Path | None:
    """The local checkpoint folder ``path_or_id`` names, or None for a Hub repo id; a path that
    exists, or looks like one (./ / ~), but is no folder is refused."""
    local = Path(os.path.expanduser(path_or_id))
    if local.is_dir():
        return local
    if local.exists() or path_or_id.startswith((".", "/", "~")):
        raise CheckpointError(f"model.path={path_or_id!r} is not a folder")
    return None


def resolve_checkpoint(path_or_id: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id fetched (or found in the HF cache)."""
    if (local := local_folder(path_or_id)) is not None:
        return local
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            path_or_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
        )
    except Exception as err:  # offline, unknown repo, no access: say which checkpoint and why
        raise CheckpointError(f"cannot fetch checkpoint {path_or_id!r} from the Hugging Face Hub: {err}") from err
    return Path(folder)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object of model settings (it holds a {type(config).__name__})")
    return config


# config.json fields (of any family) that the readers compute with: the least integer each may be.
# "abc" or 0 would otherwise fail there as a TypeError or ZeroDivisionError, or build a broken model.
INTEGER_FIELDS = {
    **dict.fromkeys(("d_model", "hidden_size", "n_layers", "num_hidden_layers", "n_heads", "num_attention_heads",
                     "n_kv_heads", "num_key_value_heads", "head_dim", "mlp_hidden_size", "intermediate_size",
                     "moe_intermediate_size", "expert_intermediate_size", "vocab_size", "embedding_size",
                     "max_sequence_length", "max_position_embeddings", "num_experts", "num_experts_per_tok",
                     "n_group", "topk_group", "block_size", "bd_size"), 1),
    **dict.fromkeys(("first_k_dense_replace", "num_shared_experts", "mask_token_id", "pad_token_id",
                     "bos_token_id", "eos_token_id"), 0),
}
# Fields whose null the readers take for "absent" (``cfg.get(field) or default``), and token ids, which
# published configs often leave null (one a family reads is checked in the model's fields, below).
NULLABLE_FIELDS = {"n_kv_heads", "num_key_value_heads", "head_dim", "embedding_size", "first_k_dense_replace",
                   "num_shared_experts", "rope_theta", "mask_token_id", "pad_token_id", "bos_token_id",
                   "eos_token_id"}
# An RMSNorm epsilon <= 0 divides by zero (or takes the root of a negative); a RoPE base <= 0 gives nan.
POSITIVE_FIELDS = ("rms_norm_eps", "rope_theta")


def check_config_values(cfg: dict) -> None:
    """Refuse a config.json field of the wrong type or range, naming it (see INTEGER_FIELDS)."""
    for field, value in cfg.items():
        if value is None and field in NULLABLE_FIELDS:
            continue
        either = " or null" if field in NULLABLE_FIELDS else ""
        if field in INTEGER_FIELDS:
            values = value if field == "eos_token_id" and isinstance(value, list) else [value]  # HF allows a list
            if any(isinstance(v, bool) or not isinstance(v, int) or v < INTEGER_FIELDS[field] for v in values):
                raise ValueError(f"{field}={value!r} must be an integer >= {INTEGER_FIELDS[field]}{either}")
        elif field in POSITIVE_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                           or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{field}={value!r} must be a finite number > 0{either}")


def check_token_ids(args: ModelArgs) -> None:
    """The special tokens the decoding loop writes into the sequence are rows of the embedding."""
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < args.vocab_size:
            raise ValueError(f"{name}={value!r} is not a token id of the model, whose embedding has "
                             f"{args.vocab_size} rows (allowed: 0 ... {args.vocab_size - 1})")


def family_of_config(cfg: dict) -> str | None:
    """The family a config.json describes (model_type, and for "llada" whether it has experts)."""
    return next((name for name, module in FAMILY_OF_NAME.items() if module.describes(cfg)), None)


def model_args(folder: Path, expected_family: str | None = None) -> ModelArgs:
    cfg = read_config(folder)
    family = family_of_config(cfg)
    if family is None:
        raise CheckpointError(
            f"{folder}/config.json: model_type {cfg.get('model_type')!r} is not supported (allowed: {MODEL_TYPES})"
        )
    if expected_family is not None and expected_family != family:
        raise CheckpointError(
            f"{folder} is a {family!r} checkpoint (model_type {cfg.get('model_type')!r}) but the config says "
            f"family={expected_family!r}"
        )
    try:
        check_config_values(cfg)
        args = FAMILY_OF_NAME[family].args_from_config(cfg)
        check_token_ids(args)
    except KeyError as err:
        raise CheckpointError(f"{folder}/config.json lacks the field {err.args[0]!r}") from err
    except ValueError as err:  # wrong values, unsupported options, inconsistent head counts
        raise CheckpointError(f"{folder}/config.json: {err}") from err
    return args


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


@contextmanager
def open_shard(shard: Path, device: str = "cpu") -> Iterator:
    """``safe_open`` whose errors (a truncated or garbage file) name the file."""
    try:
        with safe_open(shard, framework="pt", device=device) as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(f"{shard} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def fused_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of tensors of these shapes concatenated along dim 0."""
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def plan_loading(folder: Path, args: ModelArgs) -> dict[Path, list[tuple[str, Native]]]:
    """Which (checkpoint key, native key(s)) pairs to read from which shard; raises on any mismatch."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    to_native = dict(FAMILY_OF_NAME[args.family].key_pairs(args))
    plan: dict[Path, list[tuple[str, Native]]] = {}
    found: set[str] = set()
    problems: list[str] = []
    for shard in shard_files(folder):
        if not shard.is_file():
            raise CheckpointError(f"missing shard {shard}")
        with open_shard(shard) as f:
            for key in f.keys():
                native = to_native.get(key)
                if native is None:
                    if not key.endswith("rotary_emb.inv_freq"):  # some exports carry RoPE buffers
                        problems.append(f"unexpected key {key}")
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                implied = fused_shape([expected[n] for n in native_keys(native)])
                if shape != implied:
                    problems.append(f"{key}: shape {shape}, config.json implies {implied}")
                plan.setdefault(shard, []).append((key, native))
                found.add(key)
    problems += [f"missing key {k}" for k in to_native if k not in found]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {folder} does not match its config: {shown}")
    return plan


def load_model(
    path_or_id: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    expected_family: str | None = None,
    revision: str | None = None,
) -> Transformer:
    folder = resolve_checkpoint(path_or_id, revision)
    args = model_args(folder, expected_family)
    plan = plan_loading(folder, args)
    # Allocate directly in the target dtype: materialising float32 first and casting afterwards
    # would hold the model twice (and in float32) in memory.
    with torch.device("meta"):
        net = Transformer(args).to(dtype)
    net.to_empty(device=device)
    params = net.state_dict()
    for shard, pairs in plan.items():
        with open_shard(shard, str(device)) as f:
            for key, native in pairs:
                parts = native_keys(native)
                pieces = f.get_tensor(key).to(dtype).split([params[n].shape[0] for n in parts])
                for part, piece in zip(parts, pieces):
                    params[part].copy_(piece)
    if args.tie_embeddings:
        net.output.weight = net.tok_embeddings.weight
    return net.eval().requires_grad_(False)


def save_checkpoint(net: Transformer, folder: str | Path, max_shard_bytes: int = 2**30) -> None:
    """Write config.json + (sharded) safetensors with the family's real key names."""
    from safetensors.torch import save_file

    if any(isinstance(m, PackedLinear) for m in net.modules()):
        raise ValueError("this model's linear weights are prepacked for CPU inference (dllm.models.packed); "
                         "save the model before pack_linear_weights, or load it again")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # The weights of a checkpoint saved here before (sharded otherwise) go first: the loader would
    # read an old index, and with it the old shards, in place of a new single file.
    for stale in (folder / "model.safetensors", folder / "model.safetensors.index.json",
                  *folder.glob("model-*-of-*.safetensors")):
        stale.unlink(missing_ok=True)
    args = net.args
    family = FAMILY_OF_NAME[args.family]
    (folder / "config.json").write_text(json.dumps(family.config_from_args(args), indent=2) + "\n")
    state = net.state_dict()

    def stored(native: Native) -> torch.Tensor:  # a fused tensor is a new one, any other the model's own
        parts = [state[n].detach().to("cpu") for n in native_keys(native)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()

    tensors = {ck: stored(nk) for ck, nk in family.key_pairs(args)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
