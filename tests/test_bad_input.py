"""Bad input is refused before any model loads, with one message naming the key, the value and
what is allowed; ``python run.py`` prints it as one line (no traceback) and exits 2."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch):
    import dllm.pipeline

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", refuse)


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny checkpoint with a truncated and a garbage model.safetensors."""
    base = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, cut in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"not safetensors" * 8)):
        folder = base / name
        shutil.copytree(ROOT / "assets" / "tiny_llada", folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        out[name] = folder
    listed = base / "listjson"
    shutil.copytree(ROOT / "assets" / "tiny_llada", listed)
    (listed / "config.json").write_text("[]")
    out["listjson"] = listed
    out["binary_prompts"] = base / "prompts.jsonl"
    out["binary_prompts"].write_bytes(b'\xff{"prompt": "x"}\n')
    out["oov_frequencies"] = base / "frequencies.json"  # token 99999: beyond the tiny vocabulary
    out["oov_frequencies"].write_text('{"5": 3, "99999": 1}')
    return out


CASES = [
    (["seed=1.5"], r"seed=1\.5 must be an integer >= 0"),
    (["batch_size=0"], r"batch_size=0 must be an integer >= 1"),
    (["gen_length=sixty"], r"gen_length='sixty' must be an integer >= 1"),
    (["gen_length=-64"], r"gen_length=-64 must be an integer >= 1"),
    (["gen_length=0"], r"gen_length=0 must be an integer >= 1"),
    (["gen_length=8192"], r"gen_length=8192 leaves no room for a prompt: model=tiny_llada has max_seq_len=4096"),
    (["task=generate", "prompt=''"], r"prompt: an empty prompt"),
    (["+cache.kk=3"], r"cache=none has no parameter cache\.kk .*allowed: \[\]"),
    (["cache=d2cache", "+cache.kk=3"], r"cache=d2cache has no parameter cache\.kk \(close: \['k'\]"),
    (["+decoding.step=8"], r"decoding=low_confidence has no parameter decoding\.step \(close: \['steps'\]"),
    (["cache=d2cahe"], None),  # Hydra refuses an unknown group option itself (tested by the subprocess case)
    (["model=tiny_dream", "model.family=llada"], r"family"),
    (["model=llada"], r"huggingface-cli download GSAI-ML/LLaDA-8B-Instruct.*model\.path=/local/folder"),
    (["compile=yes"], r"compile='yes' must be true or false"),
    (["task.metric='acc,none'"], r"task\.metric='acc,none' is not among lm-eval task 'arith''s results "
                                 r"\['exact_match,strict-match', 'exact_match,flexible-extract'\]"),
    # values of the wrong type for a parameter's annotation, named (they failed deep in a run, or ran)
    (["decoding.steps=abc"], r"decoding=low_confidence: decoding\.steps='abc' must be an integer"),
    (["decoding.steps=true"], r"decoding\.steps=True must be an integer"),
    (["decoding.steps=2.5"], r"decoding\.steps=2\.5 must be an integer"),
    (["decoding.block_length=abc"], r"decoding\.block_length='abc' must be an integer or null"),
    (["decoding.temperature=nan"], r"decoding\.temperature=nan must be a number \(not nan\)"),
    (["decoding.temperature=abc"], r"decoding\.temperature='abc' must be a number$"),
    (["decoding.temperature=inf"], r"decoding\.temperature=inf must be a finite number >= 0"),
    (["decoding.cfg_scale=nan"], r"decoding\.cfg_scale=nan must be a number in \[0, 10000\]"),
    (["decoding.cfg_scale=1e300"], r"decoding\.cfg_scale=1e\+300 must be a number in \[0, 10000\]"),
    (["model=tiny_sdar", "decoding=block_diffusion", "decoding.cfg_scale=1"],
     r"decoding\.cfg_scale=1: decoding='block_diffusion' decodes block-diffusion models"),
    (["decoding=certainty_prior", "decoding.sigma=1e-300"], r"decoding\.sigma=1e-300 must be a number in \[1e-06, 10000\]"),
    (["cache=d2cache", "cache.sigma=1e9"], r"cache\.sigma=1000000000\.0 must be a number in \[1e-06, 10000\]"),
    (["cache=dpad", "cache.k_sigma=inf"], r"cache\.k_sigma=inf must be a finite number > 0"),
    (["cache=d2cache", "cache.k=true"], r"cache=d2cache: cache\.k=True must be an integer"),
    (["cache=dkv_decode", "cache.refresh_interval=true"], r"cache\.refresh_interval=True must be an integer"),
    (["cache=dllm_cache", "cache.update_ratio=abc"], r"cache\.update_ratio='abc' must be a number"),
    (["cache=dkv_decode", "cache.shift_rule=un"], r"cache\.shift_rule='un' is the dKV-Cache reference's Dream rule"),
    (["model.path=/nonexistent/folder"], r"model\.path='/nonexistent/folder' is not a folder"),
    (["model.revision=main"], r"model\.revision='main' names a Hub commit, branch or tag; model\.path='assets/tiny_llada' "
                              r"is a local folder, whose files are what runs \(allowed: null\)"),
    (["model.path={truncated}"], r"truncated/model\.safetensors is not a readable safetensors file"),
    (["model.path={garbage}"], r"garbage/model\.safetensors is not a readable safetensors file"),
    (["model.path={listjson}"], r"listjson/config\.json is not a JSON object of model settings \(it holds a list\)"),
    (["model=tiny_llada_random", "gen_length=100000"], r"gen_length=100000 leaves no room for a prompt: "
                                                       r"model=tiny_llada_random has max_seq_len=4096"),
    (["model=tiny_sdar", "decoding=block_diffusion", "decoding.block_length=1000000000", "gen_length=32"],
     r"gen_length=32 \(laid out in blocks of decoding\.block_length=1000000000: 1000000000 positions\) leaves no room"),
    (["model=tiny_dream", "decoding=dream", "decoding.alg=entropy", "decoding.alg_temp=inf"],
     r"decoding\.alg_temp=inf must be a finite number >= 0"),
    # settings the chosen rule never reads, and a factor that commits every block at once
    (["model=tiny_dream", "decoding=dream", "decoding.alg=confidence_threshold", "decoding.eps=0.5"],
     r"decoding\.eps=0\.5: alg=confidence_threshold has no timesteps"),
    (["model=tiny_dream", "decoding=dream", "decoding.alg=entropy", "decoding.top_k=100000"],
     r"decoding\.top_k=100000 exceeds the vocabulary \(\d+ tokens\)"),
    (["decoding=threshold", "decoding.ratio_window=8"], r"decoding\.ratio_window=8 / ratio_masked='query' shape the "
                                                         r"context-aware threshold, which is off"),
    (["decoding=threshold", "decoding.ratio_masked=block"], r"ratio_masked='block' shape the context-aware threshold"),
    (["decoding=threshold", "decoding.threshold=0.5", "decoding.factor=1"], r"decoding\.threshold=0\.5 applies to the "
                                                                              r"threshold rule; factor=1"),
    (["decoding=threshold", "decoding.factor=inf"], r"decoding\.factor=inf must be a finite number > 0"),
    (["decoding=pc_sampler", "decoding.alpha=5"], r"decoding\.alpha=5(\.0)? clips the calibrated score, which needs "
                                                  r"decoding\.frequencies"),
    (["model=tiny_sdar", "decoding=block_diffusion", "decoding.remasking=static", "decoding.threshold=0.5",
      "gen_length=16"], r"decoding\.threshold=0\.5 is read by remasking=dynamic only"),
    (["force=maybe"], r"force='maybe' must be true or false"),
    (["task.fewshot_as_multiturn=3"], r"task\.fewshot_as_multiturn=3 must be true or false"),
    (["task=generate", "task.prompts=abc"], r"task\.prompts='abc' \(allowed: a non-empty list of texts"),
    (["task=generate", "task.prompts=[]"], r"task\.prompts=\[\] \(allowed: a non-empty list of texts"),
    (["task=generate", "task.prompts=[[a],b]"], r"task\.prompts=\[\['a'\], 'b'\] \(allowed: a non-empty list of texts"),
    (["task=generate", "task.prompts=[null]"], r"task\.prompts=\[None\] \(allowed: a non-empty list of texts"),
    (["task=generate", "prompts_file={binary_prompts}"], r"prompts_file='.*prompts\.jsonl' is not UTF-8 text"),
    (["task=generate", "prompts_file=[a,b]"], r"prompts_file=\['a', 'b'\] must be a text"),
    (["task=generate", "prompts_file=5"], r"prompts_file='5' does not exist \(allowed: a jsonl file"),
    (["task=generate", "prompts_file="], r"prompts_file='' is empty"),
    (["task=generate", "prompts_file=/dev/null"], r"prompts_file='/dev/null' is not a regular file"),
    (["task=generate", "prompts_file=/"], r"prompts_file='/' is a folder"),
    (["task=gsm8k_local", "task.n_shot=100000"], r"task\.n_shot=100000: lm-eval task 'gsm8k_local' has 8 few-shot "
                                                 r"examples \(allowed: 0 \.\.\. 8\)"),
    # a group (MMLU): its subtasks' shots, the results they share
    (["task=mmlu_local", "task.n_shot=100"], r"task\.n_shot=100: lm-eval task 'mmlu_local_\w+' has 5 few-shot examples"),
    (["task=mmlu_local", "task.metric='bogus,none'"], r"task\.metric='bogus,none' is not among lm-eval group "
                                                      r"'mmlu_local''s results \['acc,none'\]"),
    (["results_csv=null"], r"results_csv=None: give the CSV file"),
    (["timing.repeats=1000000000"], r"timing\.repeats=1000000000 must be an integer >= 1 and < 101"),
    # task=generate: the prompts tokenized with the local checkpoint's tokenizer, laid out with gen_length
    (["task=generate", "prompt='What is 7 * 6?'", "gen_length=4080", "decoding.block_length=16"],
     r"prompt 0 \(\d+ tokens\) \+ gen_length=4080 lays out \d+ positions, beyond model=tiny_llada's max_seq_len=4096"),
    (["+task.code_scoring=bogus"], r"task\.code_scoring='bogus': task=arith is no code task"),
    (["task=humaneval_local", "task.code_scoring=null"], r"task\.code_scoring=None \(allowed: auto, raw, sanitize"),
    (["logger=wandb", "logger.wandb.tags=5"], r"logger\.wandb\.tags=5 must be a list of texts"),
    (["logger=wandb", "logger.wandb.tags=abc"], r"logger\.wandb\.tags='abc' must be a list of texts"),
    (["logger=wandb", "logger.wandb.entity=5"], r"logger\.wandb\.entity=5 must be a text or null"),
    (["logger=wandb", "logger.wandb.project=''"], r"logger\.wandb\.project='' must be a non-empty text"),
    (["decoding=pc_sampler", "decoding.frequencies={oov_frequencies}"],
     r"decoding\.frequencies=.*: token id 99999 is outside the model's vocabulary of \d+"),
]


@pytest.mark.parametrize("overrides, message", [c for c in CASES if c[1] is not None], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_refused_before_the_model_loads(no_model, broken_checkpoints, overrides, message, tmp_path, monkeypatch):
    from dllm.pipeline import run

    for key, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    overrides = [o.format(**broken_checkpoints) for o in overrides]
    cfg = compose(f"results_csv={tmp_path / 'runs.csv'}", *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "runs.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["seed=1.5"], "seed=1.5 must be an integer"), (["gen_length=8192"], "max_seq_len=4096"),
    (["cache=d2cache", "cache.kk=3"], "cache=d2cache has no key 'kk' (close: ['k']"),  # Hydra alone says "use +cache.kk"
])
def test_run_py_prints_one_line_and_exits_2(tmp_path, args, message):
    env = subprocess_env(tmp_path)
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"results_csv={tmp_path / 'runs.csv'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and message in done.stderr
    assert done.stderr.count("\n") <= 3  # the message and the hint on how to see the traceback
    if not args[-1].startswith("cache."):  # the override check runs before Hydra, without a config
        debug = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "debug=true"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_bad_debug_value_is_one_line_too(tmp_path):
    """debug=maybe is no reason to show a traceback: refused like any other boolean."""
    env = subprocess_env(tmp_path)
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "debug=maybe", f"results_csv={tmp_path / 'runs.csv'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: debug='maybe' must be true or false")


@pytest.mark.parametrize("problem", ["read-only folder", "foreign csv", "cut csv", "lock is a folder"])
def test_a_results_csv_that_cannot_take_the_row_is_refused_first(no_model, tmp_path, monkeypatch, problem):
    """Checked before the model loads, not after the whole run."""
    from dllm.pipeline import run

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results"
    folder.mkdir()
    csv_path = folder / "runs.csv"
    if problem == "read-only folder":
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):  # root ignores the mode bits: simulate with a protected file
            folder.chmod(0o755)
            csv_path.write_text("run_id,model,cache,decoding,task,status\n")
            csv_path.chmod(0o444)
    elif problem == "foreign csv":
        csv_path.write_text("name,score\nx,1\n")
    elif problem == "lock is a folder":  # FileLock would fail on it after the run
        (folder / "runs.csv.lock").mkdir()
    else:
        csv_path.write_text('run_id,model,cache,decoding,task,status\n1,m,c,d,t,"ok\n')
    before = csv_path.read_bytes() if csv_path.exists() else None
    try:
        with pytest.raises(ValueError, match=re.escape(str(csv_path))):
            run(compose(f"results_csv={csv_path}"))
    finally:
        folder.chmod(0o755)
    assert (csv_path.read_bytes() if csv_path.exists() else None) == before


def test_mistyped_group_keys_name_the_close_ones():
    from dllm.overrides import unknown_key_message

    assert "close: ['steps']" in unknown_key_message(["decoding.step=8"])
    message = unknown_key_message(["decoding=dream", "decoding.algo=entropy"])
    assert "decoding=dream has no key 'algo' (close: ['alg'" in message
    assert "cache=none has no key 'k'" in unknown_key_message(["-m", "cache=none,d2cache", "cache.k=3"])
    assert unknown_key_message(["cache=d2cache", "cache.k=3", "task.limit=1", "+cache.extra=1"]) is None  # all fine here
    assert unknown_key_message(["seed=3"]) is None
    assert unknown_key_message(["task=gsm8k", "task.cut_at_eos=false"]) is None  # a task option run.py must take
    assert unknown_key_message(["task=mbpp", "task.cut_at_until=false"]) is None


def test_compile_on_a_torch_too_old_for_it_is_refused_first(no_model, tmp_path, monkeypatch):
    """torch < 2.7 names the recompile limit differently; say so instead of an AttributeError mid-run."""
    import torch

    from dllm.pipeline import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.6.0+cpu"))
    with pytest.raises(ValueError, match=r"compile=true needs torch >= 2\.7 \(installed: 2\.6\.0\+cpu\)"):
        run(compose(f"results_csv={tmp_path / 'runs.csv'}", "compile=true"))
    monkeypatch.undo()
    from dllm.models.compiled import check_torch_version

    check_torch_version()  # the installed one is new enough


@pytest.mark.parametrize("kind", ["folder", "pipe", "device"])
def test_a_results_csv_that_is_no_regular_file_is_refused_first(no_model, tmp_path, monkeypatch, kind):
    """A pipe would block the check forever, a device (/dev/full) feed it forever, and
    os.replace would put a regular file in place of the device node."""
    from dllm.pipeline import run

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "runs.csv"
    if kind == "folder":
        path.mkdir()
    elif kind == "pipe":
        os.mkfifo(path)
    else:
        if not os.path.exists("/dev/null"):
            pytest.skip("no /dev/null")
        path = Path("/dev/null")
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")):
        run(compose(f"results_csv={path}"))
    assert path.exists() and not path.is_file()


@pytest.mark.parametrize("where", ["/proc/runs.csv", "/sys/runs.csv", "/sys/new/runs.csv"])
def test_a_results_csv_where_no_file_can_be_made_is_refused_first(no_model, tmp_path, monkeypatch, where):
    """/proc and /sys take no new file even from root, whom os.access tells they are writable: the
    append would fail after the run (or, on /proc, wait for its lock forever)."""
    from dllm.pipeline import run

    mount = Path("/", Path(where).parts[1])
    if not mount.is_dir():
        pytest.skip(f"no {mount} here")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{where}: cannot create ")):
        run(compose(f"results_csv={where}"))
    assert not Path(where).exists()


@pytest.mark.parametrize("value", ["null", "''", "5"])
def test_a_results_csv_that_is_no_file_name_is_refused_first(no_model, tmp_path, monkeypatch, value):
    from dllm.pipeline import run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"results_csv=.*: give the CSV file to append the run's row to"):
        run(compose(f"results_csv={value}"))
    assert list(tmp_path.iterdir()) == []


def test_a_task_whose_data_cannot_be_loaded_is_refused_before_the_model(tmp_path, monkeypatch):
    """Offline with an empty Hugging Face cache, task=gsm8k stops with one message, not a
    ConnectionError after the model has loaded."""
    import dllm.pipeline
    from dllm.eval.runner import run_eval

    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"task\.lm_eval_task='gsm8k': its data cannot be loaded .*HF_HOME"):
        run_eval(compose(f"results_csv={tmp_path / 'runs.csv'}", "task=gsm8k"))


@pytest.mark.parametrize("text", ["Total: ${price} dollars", "${", "${oc.env:HOME}", "a\\b", "it's", "back\\${x}", "x\\",
                                  "a\\\\b", "it\\'s", "q\\\\'z", "a\\\\${y}", "1+1=", 'say "hi"'])
def test_free_text_is_taken_literally(text):
    """prompt= reaches the config as typed: no OmegaConf interpolation, no Hydra escape read."""
    from run import quote_free_text

    assert compose("task=generate", *quote_free_text([f"prompt={text}"])).prompt == text


def test_a_bad_wandb_mode_in_the_environment_is_refused_before_the_model_loads(no_model, tmp_path, monkeypatch):
    """logger.wandb.mode=null takes $WANDB_MODE, which the sink would refuse only after the run."""
    from dllm.pipeline import run

    monkeypatch.setenv("WANDB_MODE", "bogus")
    monkeypatch.chdir(tmp_path)
    cfg = compose(f"results_csv={tmp_path / 'runs.csv'}", "logger=wandb")
    with pytest.raises(ValueError, match=r"\$WANDB_MODE='bogus', which logger\.wandb\.mode=null uses \(allowed: online"):
        run(cfg)
    # a mode set in the config wins over the environment: the run goes on to load the model
    cfg = compose(f"results_csv={tmp_path / 'runs.csv'}", "logger=wandb", "logger.wandb.mode=offline")
    with pytest.raises(AssertionError, match="the model was loaded"):
        run(cfg)


def test_a_tiny_model_cache_that_is_a_file_is_refused_before_the_model_loads(no_model, tmp_path, monkeypatch):
    from dllm.pipeline import run

    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    for cache in ("file", "file/below"):
        monkeypatch.setenv("DLLM_CACHE", str(tmp_path / cache))
        with pytest.raises(ValueError, match=r"\$DLLM_CACHE=.*/file.* is, or lies under, a file \(allowed: a folder"):
            run(compose(f"results_csv={tmp_path / 'runs.csv'}", "model=tiny_llada_random"))
    for cache in ("/proc/dllm", "/sys/dllm"):  # nothing can be made there, not even by root
        if Path(cache).parent.is_dir():
            monkeypatch.setenv("DLLM_CACHE", cache)
            with pytest.raises(ValueError, match=rf"\$DLLM_CACHE='{cache}': the random-weight llada checkpoint cannot "
                                                 rf"be built there \(nothing can be made in {Path(cache).parent}"):
                run(compose(f"results_csv={tmp_path / 'runs.csv'}", "model=tiny_llada_random"))
