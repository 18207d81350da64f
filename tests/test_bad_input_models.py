"""Bad devices, checkpoints, prompts files and model settings are refused before any weight loads,
with one message naming the key, the value and what is allowed (see tests/test_bad_input.py)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Offline, in tmp_path, and failing if the model (or, below, its weights) would load."""
    import dllm.pipeline

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)


def tiny_copy(tmp_path: Path, name: str = "tiny_llada", drop: tuple[str, ...] = (), **fields) -> Path:
    """A copy of a committed tiny checkpoint with config.json ``fields`` changed and ``drop`` removed."""
    folder = Path(shutil.copytree(ROOT / "assets" / name, tmp_path / "ckpt"))
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **fields}))
    for file in drop:
        (folder / file).unlink()
    return folder


def refused(tmp_path: Path, *overrides: str) -> str:
    from dllm.pipeline import run

    with pytest.raises(ValueError) as err:
        run(compose(f"results_csv={tmp_path / 'runs.csv'}", *overrides))
    assert not (tmp_path / "runs.csv").exists()
    return str(err.value)


@pytest.mark.parametrize("device", ["null", "mps", "meta", "cpu:3", "cuda:99"])
def test_a_device_this_machine_lacks_is_refused(no_model, tmp_path, device):
    """torch.device takes these names; they failed (or were blamed on the safetensors file) at the load."""
    message = refused(tmp_path, f"device={device}")
    assert f"device={None if device == 'null' else device!r} (allowed here: ['auto', 'cpu'" in message


@pytest.mark.parametrize("fields, message", [
    (dict(d_model="abc"), r"config\.json: d_model='abc' must be an integer >= 1"),  # was a TypeError
    (dict(n_heads=0), r"config\.json: n_heads=0 must be an integer >= 1"),  # was a ZeroDivisionError
    (dict(n_layers=2.5), r"config\.json: n_layers=2\.5 must be an integer >= 1"),
    (dict(n_kv_heads="2"), r"config\.json: n_kv_heads='2' must be an integer >= 1 or null"),
    (dict(rms_norm_eps=-1e-5), r"config\.json: rms_norm_eps=-1e-05 must be a finite number > 0"),
    (dict(rms_norm_eps=0), r"config\.json: rms_norm_eps=0 must be a finite number > 0"),
    # an IndexError in the embedding at the first forward
    (dict(mask_token_id=576), r"config\.json: mask_token_id=576 is not a token id of the model, whose embedding "
                              r"has 576 rows \(allowed: 0 \.\.\. 575\)"),
    (dict(pad_token_id=-1), r"config\.json: pad_token_id=-1 must be an integer >= 0 or null"),
    # OLMo switches a LLaDA checkpoint sets one way: another would run as plain LLaDA
    (dict(rope=False), r"LLaDA config: rope=False is not supported \(allowed: True\)"),
    (dict(alibi=True), r"LLaDA config: alibi=True is not supported \(allowed: False\)"),
    (dict(scale_logits=True), r"LLaDA config: scale_logits=True is not supported"),
    (dict(attention_layer_norm=True), r"LLaDA config: attention_layer_norm=True is not supported"),
    (dict(clip_qkv=8.0), r"LLaDA config: clip_qkv=8\.0 is not supported \(allowed: null\)"),
])
def test_a_config_json_value_of_the_wrong_type_or_range_is_named(no_model, tmp_path, fields, message):
    assert re.search(message, refused(tmp_path, f"model.path={tiny_copy(tmp_path, **fields)}"))


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_a_null_bos_token_id_means_endoftext(tmp_path, family):
    """Published Qwen-family configs may leave bos_token_id null: the authors' pad <|endoftext|>
    (151643) is meant. SDAR's reader failed on it with a TypeError."""
    from dllm.models.loading import FAMILY_OF_NAME, read_config
    from dllm.models.tiny import make_tiny_checkpoint

    config = read_config(make_tiny_checkpoint(family, tmp_path / family))
    args = FAMILY_OF_NAME[family].args_from_config({**config, "bos_token_id": None})
    assert args.pad_token_id == 151643


def test_a_config_json_eos_list_is_still_read(tmp_path):
    """Hugging Face configs may list several eos ids; the first is the model's."""
    from dllm.models.loading import model_args

    assert model_args(tiny_copy(tmp_path, "tiny_dream", eos_token_id=[512, 513])).eos_token_id == 512


def test_a_checkpoint_without_a_tokenizer_is_refused_before_its_weights(tmp_path, monkeypatch):
    import dllm.models.loading
    from dllm.pipeline import run

    def refuse(*_a, **_k):
        raise AssertionError("the weights were read before the tokenizer was found")

    monkeypatch.setattr(dllm.models.loading, "load_model", refuse)
    monkeypatch.chdir(tmp_path)
    folder = tiny_copy(tmp_path, drop=TOKENIZER_FILES)
    with pytest.raises(ValueError, match=f"the checkpoint folder {folder} has no usable tokenizer") as err:
        run(compose(f"results_csv={tmp_path / 'runs.csv'}", f"model.path={folder}", "task=generate"))
    assert "\n" not in str(err.value)  # one line, however many the tokenizer library wrote


@pytest.mark.parametrize("line, message", [
    ('{"text": "1+1="}', r"line 2: '\{\"text\": \"1\+1=\"\}' \(allowed: an object with a text \"prompt\""),  # KeyError
    ("[1, 2]", r"line 2: '\[1, 2\]' \(allowed: an object"),  # TypeError
    ('{"prompt": null}', r"line 2: '\{\"prompt\": null\}' \(allowed: an object"),  # generated from "None"
    ("{bad", r"line 2 is not JSON \(Expecting property name"),  # named neither the file nor the line
])
def test_a_bad_prompts_file_line_is_named_with_its_number(no_model, tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "2+2="}\n' + line + "\n")
    message = rf"prompts_file='{re.escape(str(path))}' {message}"
    assert re.search(message, refused(tmp_path, "task=generate", f"prompts_file={path}"))


@pytest.mark.parametrize("seed", [2**32, 99999999999999999999])
def test_a_seed_beyond_numpys_range_is_refused(no_model, tmp_path, seed):
    """lm-eval seeds numpy with it (< 2**32); torch failed on >= 2**64 without naming the seed."""
    assert f"seed={seed} must be an integer >= 0 and < 4294967296" in refused(tmp_path, f"seed={seed}")


@pytest.mark.parametrize("override", ["cache.refresh_interval=2", "cache.dream_rows=reference"])
def test_block_cache_options_on_a_block_diffusion_model_are_refused_before_the_load(no_model, tmp_path, override):
    """The README lists them as refused; they were, but only in the warm-up batch."""
    message = refused(tmp_path, "model=tiny_sdar", "decoding=block_diffusion", "cache=prefix", override)
    assert "have no meaning on a block-diffusion model" in message and override.split("=")[0] in message


@pytest.mark.parametrize("key", ["model.instruct", "model.tiny", "model.trust_remote_code"])
def test_model_switches_must_be_booleans(no_model, tmp_path, key):
    """Hydra keeps `maybe` as a text, which read as true."""
    assert f"{key}='maybe' must be true or false" in refused(tmp_path, f"{key}=maybe")


def test_an_empty_model_path_is_refused_on_a_preset_with_weights(no_model, tmp_path):
    """It silently swapped tiny_llada's trained weights for random ones; null stays the way to ask for those."""
    message = refused(tmp_path, "model.path=")
    assert "model=tiny_llada: model.path='' is empty (allowed: a Hub id, a local folder, or null for random" in message
    assert "model.path=None is empty" in refused(tmp_path, "model=llada", "model.path=null")


@pytest.mark.parametrize("key", ["prompt", "prompts_file"])
def test_a_prompt_outside_task_generate_is_refused(no_model, tmp_path, key):
    """The task's own data was used and the prompt silently ignored."""
    assert f"{key}='hello' applies to task=generate only (task=arith" in refused(tmp_path, f"{key}=hello")


@pytest.mark.parametrize("args, message", [(["device=meta"], "device='meta' (allowed here: ['auto', 'cpu'"),
                                           (["model.path={ckpt}"], "n_heads=0 must be an integer >= 1")])
def test_run_py_prints_one_line_and_exits_2(tmp_path, args, message):
    ckpt = tiny_copy(tmp_path, n_heads=0)
    env = subprocess_env(tmp_path)
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *[a.format(ckpt=ckpt) for a in args],
                           f"results_csv={tmp_path / 'runs.csv'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and message in done.stderr and done.stderr.count("\n") <= 3
