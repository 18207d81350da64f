"""Tiny checkpoints in the real on-disk format: loading, sharding, tokenizer, and loud failures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dllm.models import loading
from dllm.models.loading import CheckpointError, load_model
from dllm.models.tiny import ensure_tiny, make_tiny_checkpoint

FAMILIES = ["llada", "dream"]
# One config field per family that sets the hidden size, to corrupt the shapes.
DIM_FIELD = {"llada": "d_model", "dream": "hidden_size"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_checkpoint(f, root / f) for f in FAMILIES}


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_config(folder: Path, **fields) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so patch its constant as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Make reading any tensor *data* fail; headers (keys, shapes) stay readable."""

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self._f = safe_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, key):
            return self._f.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError(f"weight {key} was read before the checkpoint was validated")

    monkeypatch.setattr(loading, "safe_open", HeaderOnly)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_loads_with_finite_logits(tiny, family):
    net = load_model(str(tiny[family]), expected_family=family)
    cfg = json.loads((tiny[family] / "config.json").read_text())
    assert net.args.family == family
    assert net.args.mask_token_id == cfg["mask_token_id"]
    assert net.args.n_kv_heads < net.args.n_heads  # GQA is exercised
    tokens = torch.randint(0, net.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = net(tokens)
    assert logits.shape == (2, 9, net.args.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_match_the_files(tiny, family):
    net = load_model(str(tiny[family]))
    files = all_tensors(tiny[family])
    pairs = dict(loading.FAMILY_OF_NAME[family].key_pairs(net.args))
    state = net.state_dict()
    assert set(files) == set(pairs)
    for key, tensor in files.items():
        assert tensor.dtype == torch.bfloat16  # stored like the published checkpoints
        assert torch.equal(state[pairs[key]], tensor.float())


def test_loads_straight_into_bfloat16(tiny):
    net = load_model(str(tiny["dream"]), dtype=torch.bfloat16)
    assert {p.dtype for p in net.state_dict().values()} == {torch.bfloat16}
    files = all_tensors(tiny["dream"])
    assert torch.equal(net.state_dict()["layers.1.attn.wk.bias"], files["model.layers.1.self_attn.k_proj.bias"])


def test_same_seed_same_weights(tmp_path):
    a = all_tensors(make_tiny_checkpoint("dream", tmp_path / "a", seed=3))
    b = all_tensors(make_tiny_checkpoint("dream", tmp_path / "b", seed=3))
    c = all_tensors(make_tiny_checkpoint("dream", tmp_path / "c", seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_round_trip(tiny, tmp_path, family):
    sharded = make_tiny_checkpoint(family, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    single, split = load_model(str(tiny[family])), load_model(str(sharded))
    a, b = single.state_dict(), split.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_writing_over_another_checkpoint_replaces_its_weights(tmp_path):
    """A single file over a sharded checkpoint and back: no old index or shard is left to be loaded."""
    folder = tmp_path / "ckpt"
    make_tiny_checkpoint("llada", folder, seed=0, max_shard_bytes=40_000)
    single = all_tensors(make_tiny_checkpoint("llada", folder, seed=7))
    assert sorted(f.name for f in folder.glob("model*")) == ["model.safetensors"]
    loaded = load_model(str(folder)).state_dict()
    assert torch.equal(loaded["tok_embeddings.weight"].to(torch.bfloat16), single["model.transformer.wte.weight"])
    make_tiny_checkpoint("llada", folder, seed=7, max_shard_bytes=40_000)
    assert not (folder / "model.safetensors").exists()
    assert all(torch.equal(a, b) for a, b in zip(load_model(str(folder)).state_dict().values(), loaded.values()))


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer(tiny, family, offline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[family])
    cfg = json.loads((tiny[family] / "config.json").read_text())
    assert tok.mask_token_id == cfg["mask_token_id"]
    assert tok.eos_token_id == cfg["eos_token_id"] == tok.pad_token_id
    assert len(tok) <= cfg["vocab_size"] and cfg["vocab_size"] % 64 == 0
    for text in ["1+1=", "Q: Tom has 3 apples. #### 5", "Ünïcode ✓\n\n  spaces"]:
        assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1="}], add_generation_prompt=True, tokenize=False)
    if family == "llada":
        assert tok.bos_token == "<|startoftext|>"
        assert prompt == (
            "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n1+1=<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        specials = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    else:
        assert prompt == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"
        )
        specials = ["<|im_start|>", "<|im_end|>"]
    # Special tokens are single ids, so the chat markup tokenises as in the real checkpoints.
    for s in specials + [tok.mask_token, tok.eos_token]:
        assert len(tok.encode(s)) == 1


def test_ensure_tiny_caches(tmp_path):
    first = ensure_tiny("llada", tmp_path)
    assert first == tmp_path / "tiny_llada-v1"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny("llada", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left over


# --- failures: raised from config.json and the safetensors headers, before any weight is read


def test_no_weight_reads_fixture_bites(tiny, no_weight_reads):
    # Control: a valid checkpoint gets past validation and then trips the guard.
    with pytest.raises(AssertionError, match="was read before"):
        load_model(str(tiny["llada"]))


def test_wrong_model_type(tiny, tmp_path, no_weight_reads):
    folder = copy_of(tiny["llada"], tmp_path)
    edit_config(folder, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_model(str(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_config_shapes_disagree_with_weights(tiny, tmp_path, no_weight_reads, family):
    folder = copy_of(tiny[family], tmp_path)
    edit_config(folder, **{DIM_FIELD[family]: 32})
    with pytest.raises(CheckpointError, match=r"shape \(\d+, 64\), config.json implies \(\d+, 32\)"):
        load_model(str(folder))


def test_inconsistent_heads_in_config(tiny, tmp_path, no_weight_reads):
    folder = copy_of(tiny["dream"], tmp_path)
    edit_config(folder, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="n_kv_heads=3"):
        load_model(str(folder))


def test_missing_config_field(tiny, tmp_path, no_weight_reads):
    folder = copy_of(tiny["llada"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["n_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks the field 'n_layers'"):
        load_model(str(folder))


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_key(tiny, tmp_path, no_weight_reads):
    folder = copy_of(tiny["llada"], tmp_path)
    rewrite_weights(folder, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_model(str(folder))


def test_unexpected_key(tiny, tmp_path, no_weight_reads):
    folder = copy_of(tiny["dream"], tmp_path)
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.0\.mlp\.extra\.weight"):
        load_model(str(folder))


def test_missing_shard(tiny, tmp_path, no_weight_reads):
    folder = make_tiny_checkpoint("llada", tmp_path / "sharded", max_shard_bytes=40_000)
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{victim.name}"):
        load_model(str(folder))


def test_family_mismatch(tiny, no_weight_reads):
    with pytest.raises(CheckpointError, match="family='dream'"):
        load_model(str(tiny["llada"]), expected_family="dream")


def test_missing_folder(tmp_path, no_weight_reads):
    with pytest.raises(CheckpointError, match="does_not_exist"):
        load_model(str(tmp_path / "does_not_exist"))


def test_missing_hub_id_offline(offline, no_weight_reads):
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


@pytest.mark.parametrize("bad, message", [
    (["--seed", "18446744073709551616"], "argument --seed: 18446744073709551616 must be from 0 to 4294967295"),
    (["--seed", "-1"], "argument --seed: -1 must be from 0 to 4294967295"),
    (["--shard-bytes", "0"], "--shard-bytes=0 must be >= 1"),
])
def test_make_tiny_checkpoint_script_refuses_before_writing(tmp_path, capsys, bad, message):
    import runpy

    from dllm import REPO_ROOT

    script = runpy.run_path(str(REPO_ROOT / "scripts" / "make_tiny_checkpoint.py"))
    with pytest.raises(SystemExit) as exit_:
        script["main"](["--family", "llada", "--out", str(tmp_path / "out"), *bad])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
