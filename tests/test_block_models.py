"""The block-diffusion families SDAR / TraDo (Qwen3) and Fast-dLLM v2 (Qwen2.5): the published config.json
files read as the published models, causal parity with transformers' Qwen3 / Qwen2 through the real
checkpoint key names, block-causal attention against a float64 reference, and tiny checkpoints in the
exact on-disk format (config fields, key names, sharding, tokenizer, generation_config.json)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm.models import fast_dllm_v2, sdar
from dllm.models.loading import CheckpointError, load_model, save_checkpoint
from dllm.models.tiny import make_tiny_checkpoint
from dllm.models.transformer import Transformer

from conftest import assert_causal_matches, compose, float64_reference, left_padded, random_prompts, tiny_args, tiny_net

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("sdar", "fast_dllm_v2")
MODULES = {"sdar": sdar, "fast_dllm_v2": fast_dllm_v2}

# ------------------------------------------------------------------ the published config.json files

# JetAstra/SDAR training/model/SDAR-4B-Chat/config.json (auto_map and training switches left out).
SDAR_4B = {
    "architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None,
    "max_position_embeddings": 32768, "vocab_size": 151936, "tie_word_embeddings": False, "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "block_size": 4,
    "mask_token_id": 151669, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 36,
    "use_cache": False, "torch_dtype": "bfloat16",
}
# Efficient-Large-Model/Fast_dLLM_v2_7B config.json (auto_map and layer_types left out).
FAST_7B = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "hidden_act": "silu", "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-06, "vocab_size": 152064,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151645,
    "pad_token_id": 151645, "bd_size": 32, "conplemenrary_mask": True, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 28, "attention_dropout": 0.0, "use_cache": True,
    "torch_dtype": "bfloat16",
}
# Fast_dLLM_v2_1.5B differs in its sizes and ties its LM head to the embedding.
FAST_1_5B = {**FAST_7B, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "max_window_layers": 21}
del FAST_1_5B["conplemenrary_mask"]


def meta_shapes(module, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> the shape the native model built from ``cfg`` expects there."""
    args = module.args_from_config(cfg)
    with torch.device("meta"):
        state = Transformer(args).state_dict()
    return {ck: tuple(state[nk].shape) for ck, nk in module.key_pairs(args)}


def test_sdar_4b_config_reads_as_the_published_model():
    args = sdar.args_from_config(SDAR_4B)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (2560, 36, 32, 8)
    assert (args.head_dim, args.ffn_dim) == (128, 9728)
    assert args.qk_norm and args.block_causal and not args.qkv_bias and not args.tie_embeddings
    assert (args.logit_shift, args.rope_theta, args.norm_eps, args.max_seq_len) == (0, 1e6, 1e-6, 32768)
    # Stops on <|im_end|> (the chat turn's end), pads with <|endoftext|>.
    assert (args.mask_token_id, args.eos_token_id, args.pad_token_id) == (151669, 151645, 151643)
    shapes = meta_shapes(sdar, SDAR_4B)
    assert len(shapes) == 399  # the published index: 36 layers x 11 + 3
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32 * 128, 2560)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (2560, 32 * 128)
    assert shapes["model.layers.35.self_attn.k_norm.weight"] == (128,)
    assert shapes["lm_head.weight"] == (151936, 2560)
    # The Hub's copy of the same config.json lacks block_size and mask_token_id.
    hub = {k: v for k, v in SDAR_4B.items() if k not in ("block_size", "mask_token_id")}
    assert sdar.args_from_config(hub) == args
    assert args.trained_block_length == 4 and sdar.args_from_config({**SDAR_4B, "block_size": 8}).trained_block_length == 8


@pytest.mark.parametrize("cfg, n_keys", [(FAST_7B, 339), (FAST_1_5B, 338)], ids=["7b", "1.5b_tied"])
def test_fast_dllm_v2_config_reads_as_the_published_model(cfg, n_keys):
    args = fast_dllm_v2.args_from_config(cfg)
    assert (args.n_layers, args.head_dim, args.ffn_dim) == (28, 128, cfg["intermediate_size"])
    assert args.qkv_bias and args.block_causal and not args.qk_norm and args.trained_block_length == 32
    assert args.tie_embeddings == cfg["tie_word_embeddings"]
    assert (args.logit_shift, args.rope_theta, args.norm_eps) == (1, 1e6, 1e-6)
    assert (args.mask_token_id, args.eos_token_id, args.pad_token_id) == (151665, 151645, 151643)
    shapes = meta_shapes(fast_dllm_v2, cfg)
    assert len(shapes) == n_keys  # 7B: the published index's 339 = 28 x 12 + 3; tied: no lm_head.weight
    assert ("lm_head.weight" in shapes) != args.tie_embeddings
    kv = cfg["num_key_value_heads"] * 128
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (kv, cfg["hidden_size"])
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (kv,)


@pytest.mark.parametrize("family, cfg, field, value", [
    ("sdar", SDAR_4B, "attention_bias", True),  # Qwen3 would add an o_proj bias too
    ("sdar", SDAR_4B, "rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("fast_dllm_v2", FAST_7B, "use_sliding_window", True),
    ("fast_dllm_v2", FAST_7B, "hidden_act", "gelu"),
])
def test_unsupported_config_values_are_refused(family, cfg, field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
        MODULES[family].args_from_config({**cfg, field: value})


# ------------------------------------------------------------------ tiny checkpoints in the published format


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Per family, the tiny checkpoint as make_tiny_checkpoint writes it (bfloat16)."""
    root = tmp_path_factory.mktemp("tiny_block")
    return {f: make_tiny_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny) -> dict[str, Path]:
    """The tiny checkpoints with tiny_net's weights instead (random norm weights and biases, so that a
    swapped or missing norm shows), in float32 so that parity is checked at float32 tolerance."""
    root = tmp_path_factory.mktemp("random_block")
    out = {}
    for seed, family in enumerate(FAMILIES):
        folder = Path(shutil.copytree(tiny[family], root / family))
        save_checkpoint(tiny_net(load_model(str(folder)).args, seed=seed), folder)
        out[family] = folder
    return out


def hf_model(folder: Path):
    """transformers' Qwen3ForCausalLM (SDAR) or Qwen2ForCausalLM (Fast-dLLM v2) built from the checkpoint's
    config.json, holding its tensors under their own names (they are Qwen3's / Qwen2's)."""
    cfg = json.loads((folder / "config.json").read_text())
    common = dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"],
        max_position_embeddings=cfg["max_position_embeddings"], tie_word_embeddings=cfg["tie_word_embeddings"],
        use_sliding_window=False, attention_dropout=0.0, hidden_act="silu",
    )
    if cfg["model_type"] == "sdar":
        config = transformers.Qwen3Config(head_dim=cfg["head_dim"], attention_bias=False, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(all_tensors(folder), strict=False)
    tied = {"lm_head.weight"} if cfg["tie_word_embeddings"] else set()
    assert not unexpected and not [k for k in missing if "rotary_emb" not in k and k not in tied], (missing, unexpected)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_matches_transformers(checkpoints, family):
    """Run causally (left-padded rows), the native model is Qwen3 (SDAR, with QK-norm and a head_dim wider
    than hidden / heads) or Qwen2 (Fast-dLLM v2, with q/k/v biases)."""
    net = load_model(str(checkpoints[family]), expected_family=family)
    assert net.args.n_kv_heads < net.args.n_heads
    if family == "sdar":
        assert net.args.head_dim > net.args.dim // net.args.n_heads
    assert_causal_matches(net, hf_model(checkpoints[family]), random_prompts([12, 7, 9], seed=3))


def test_tied_fast_dllm_v2_checkpoint_matches_transformers(checkpoints, tmp_path):
    """Fast_dLLM_v2_1.5B's layout: tie_word_embeddings true and no lm_head.weight in the files."""
    args = dataclasses.replace(load_model(str(checkpoints["fast_dllm_v2"])).args, tie_embeddings=True)
    save_checkpoint(tiny_net(args, seed=4), tmp_path / "tied")
    assert "lm_head.weight" not in all_tensors(tmp_path / "tied")
    net = load_model(str(tmp_path / "tied"))
    assert net.args.tie_embeddings and net.output.weight is net.tok_embeddings.weight
    assert_causal_matches(net, hf_model(tmp_path / "tied"), random_prompts([10, 6], seed=5))


def test_config_round_trips(tiny):
    for family, folder in tiny.items():
        args = load_model(str(folder)).args
        assert MODULES[family].args_from_config(MODULES[family].config_from_args(args)) == args


def test_sdar_checkpoint_on_disk(tiny):
    folder = tiny["sdar"]
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in tok["added_tokens_decoder"].items()}
    assert (cfg["model_type"], cfg["architectures"], cfg["block_size"]) == ("sdar", ["SDARForCausalLM"], 4)
    assert cfg["head_dim"] == 32 != cfg["hidden_size"] // cfg["num_attention_heads"]
    # As published: bos = eos = <|endoftext|>, no pad_token_id; the mask is <|MASK|>.
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == ids["<|endoftext|>"] and "pad_token_id" not in cfg
    assert cfg["mask_token_id"] == ids["<|MASK|>"] and not cfg["tie_word_embeddings"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    files = all_tensors(folder)
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(files)
    assert "lm_head.weight" in files
    assert not [k for k in files if k.endswith(".bias")]
    assert files["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert {t.dtype for t in files.values()} == {torch.bfloat16}
    args = load_model(str(folder)).args
    assert (args.eos_token_id, args.pad_token_id) == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert args.mask_token_id == ids["<|MASK|>"]


def test_fast_dllm_v2_checkpoint_on_disk(tiny):
    folder = tiny["fast_dllm_v2"]
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    ids = {v["content"]: int(k) for k, v in tok["added_tokens_decoder"].items()}
    assert (cfg["model_type"], cfg["architectures"]) == ("Fast_dLLM_Qwen", ["Fast_dLLM_QwenForCausalLM"])
    assert cfg["bd_size"] == 32
    # As published: eos = pad = <|im_end|>, bos <|endoftext|>; mask_token_id is the tiny tokenizer's |<MASK>|.
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == ids["<|im_end|>"]
    assert cfg["bos_token_id"] == ids["<|endoftext|>"]
    assert cfg["mask_token_id"] == ids["|<MASK>|"] and "head_dim" not in cfg
    files = all_tensors(folder)
    assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias"} <= set(files)
    assert "lm_head.weight" in files
    assert not [k for k in files if "norm" in k and "self_attn" in k]
    args = load_model(str(folder)).args
    assert (args.eos_token_id, args.pad_token_id, args.logit_shift) == (ids["<|im_end|>"], ids["<|endoftext|>"], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads_the_same(tiny, tmp_path, family):
    sharded = make_tiny_checkpoint(family, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    a, b = load_model(str(tiny[family])).state_dict(), load_model(str(sharded)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_of_the_other_family_is_refused(tiny):
    with pytest.raises(CheckpointError, match=r"is a 'sdar' checkpoint \(model_type 'sdar'\).*family='fast_dllm_v2'"):
        load_model(str(tiny["sdar"]), expected_family="fast_dllm_v2")


@pytest.mark.parametrize("family, prompt", [
    ("sdar", "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"),
    ("fast_dllm_v2", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"),
])
def test_tokenizer_and_chat_format(tiny, family, prompt):
    from dllm.models.tokenization import load_tokenizer, stop_token_ids

    tok = load_tokenizer(tiny[family])
    args = load_model(str(tiny[family])).args
    chat = [{"role": "user", "content": "1+1="}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == prompt
    assert tok.mask_token_id == args.mask_token_id and tok.bos_token is None
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == ("<|endoftext|>" if family == "sdar" else "<|im_end|>")
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", tok.mask_token):
        assert len(tok.encode(special)) == 1
    assert tok.convert_tokens_to_ids("<|im_end|>") == args.eos_token_id
    assert {args.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")} <= stop_token_ids(tok, args)
    if family == "sdar":  # Qwen3's template: an empty think block only when thinking is switched off
        off = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, enable_thinking=False)
        assert off == prompt + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_builds_its_checkpoint(family, monkeypatch, tmp_path):
    """model=tiny_<family>_random resolves to a tiny checkpoint of the family, built on first use."""
    from dllm.pipeline import load_model_and_tokenizer, plan_run

    monkeypatch.setenv("DLLM_CACHE", str(tmp_path))
    cfg = compose(f"model=tiny_{family}_random", "threads=1")
    net, tokenizer = load_model_and_tokenizer(cfg, plan_run(cfg))
    assert net.args.family == family and net.args.block_causal
    assert tokenizer.mask_token_id == net.args.mask_token_id
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny_{family}-v1"]


@pytest.mark.parametrize("path, block_length, warned", [
    (None, 4, False),  # the random-weight checkpoint, not yet built: BASE_ARGS's block
    (None, 8, True),
    ("folder", 8, False),  # config.json's block_size 8 (written below) is what counts
    ("folder", 4, True),
])
def test_a_block_other_than_the_trained_one_is_warned_of(tiny, tmp_path, caplog, path, block_length, warned):
    """decoding.block_length against the checkpoint's trained block, before any weight is read."""
    from dllm.pipeline import check_checkpoint, plan_run

    folder = tmp_path / "sdar_block8"
    shutil.copytree(tiny["sdar"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "block_size": 8}))
    model = "model=tiny_sdar_random" + (f" model.path={folder}" if path else "")
    run = compose(*model.split(), "decoding=block_diffusion", f"decoding.block_length={block_length}",
                  f"decoding.steps={block_length}", "gen_length=16")
    with caplog.at_level("WARNING", logger="dllm.pipeline"):
        check_checkpoint(run, plan_run(run))
    trained = 8 if path else 4
    message = f"decoding.block_length={block_length}, but the model was trained with blocks of {trained}"
    assert (message in caplog.text) == warned


@pytest.mark.parametrize("field, value", [("block_size", 0), ("block_size", "4"), ("bd_size", -32)])
def test_a_bad_trained_block_in_config_json_is_refused(field, value):
    from dllm.models.loading import check_config_values

    with pytest.raises(ValueError, match=f"{field}={value!r} must be an integer >= 1"):
        check_config_values({field: value})


# ------------------------------------------------------------------ block-causal attention


def block_args(family: str, **overrides):
    """A small ModelArgs of the family: SDAR with QK-norm and a head_dim wider than dim / n_heads,
    Fast-dLLM v2 with q/k/v biases and the logit shift."""
    own = {"sdar": dict(qk_norm=True, explicit_head_dim=16), "fast_dllm_v2": dict(qkv_bias=True, logit_shift=1)}
    return tiny_args(family, block_causal=True, **{**own[family], **overrides})


@pytest.mark.parametrize("block_length", [3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_causal_matches_float64_reference(family, block_length):
    """Left-padded rows whose lengths (10, 4, 7) are not all multiples of the block."""
    net = tiny_net(block_args(family, n_layers=3), seed=6)
    tokens, mask = left_padded(random_prompts([10, 4, 7], seed=7), net.args.pad_token_id)
    expected = float64_reference(net, tokens, mask, block_length=block_length)
    real = mask.bool()
    with torch.no_grad():
        ours = net(tokens, attention_mask=mask, block_length=block_length)
    torch.testing.assert_close(ours[real].double(), expected[real], atol=1e-4, rtol=1e-4)
    ours64 = net.to(torch.float64)(tokens, attention_mask=mask, block_length=block_length)
    torch.testing.assert_close(ours64[real], expected[real], atol=1e-5, rtol=1e-5)
    # The reference is neither the bidirectional nor the causal model.
    assert not torch.allclose(expected[real], float64_reference(net, tokens, mask)[real], atol=1e-3)
    assert not torch.allclose(ours64[real], net(tokens, attention_mask=mask, causal=True)[real], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_token_is_seen_by_its_block_and_later_ones(family):
    net = tiny_net(block_args(family), seed=8)
    tokens = torch.tensor(random_prompts([11], seed=9))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 60  # block 1 of 4: positions 4..7
    with torch.no_grad():
        before, after = net(tokens, block_length=4)[0], net(changed, block_length=4)[0]
    torch.testing.assert_close(after[:4], before[:4])  # block 0 cannot see it
    assert not torch.allclose(after[4], before[4], atol=1e-4)  # an earlier position of the same block does
    assert not torch.allclose(after[8:], before[8:], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_count_from_each_rows_first_token(family):
    """A left-padded row computes what it computes alone: its blocks start at its first real token."""
    net = tiny_net(block_args(family), seed=10)
    prompts = random_prompts([10, 5], seed=11)
    tokens, mask = left_padded(prompts, net.args.pad_token_id)
    with torch.no_grad():
        padded = net(tokens, attention_mask=mask, block_length=4)
        for row, prompt in enumerate(prompts):
            alone = net(torch.tensor([prompt]), block_length=4)[0]
            torch.testing.assert_close(padded[row, mask[row].bool()], alone, atol=1e-5, rtol=1e-5)
