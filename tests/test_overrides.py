"""The command-line check before Hydra (dllm/overrides.py): unknown presets, '+' on an existing key,
mistyped added keys, an experiment's methods and published settings each get one line naming the bad
value and the allowed ones; ``python run.py`` prints it as ``error: ...`` and exits 2."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from dllm.overrides import preset_keys, unknown_key_message

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (["model=nosuch"], "model=nosuch: no such model option (close: none; allowed: ['d3llm_dream'"),
    (["cache=d2cahe"], "cache=d2cahe: no such cache option (close: ['d2cache', 'dllm_cache']"),
    (["decoding=lowconf"], "decoding=lowconf: no such decoding option (close: ['low_confidence']"),
    (["task=gsm8k_nope"], "task=gsm8k_nope: no such task option (close: ['gsm8k_local', 'gsm8k']"),
    (["logger=nosuch"], "logger=nosuch: no such logger option (close: none; allowed: ['csv', 'wandb'])"),
    (["+experiment=dkv_tabel1"], "experiment=dkv_tabel1: no such experiment option (close: ['dkv_table1'"),
    (["-m", "cache=none,nosuch"], "cache=nosuch: no such cache option"),  # every value of a sweep
    (["hydra/launcher=slrum"], "hydra/launcher=slrum: no such hydra/launcher option (close: ['slurm'"),
    # a preset's name is its identity: task.name=gsm8k would run arith recorded as gsm8k
    (["task.name=gsm8k"], "task.name=gsm8k: task.name is the task preset's own; choose a preset with task=<name> "
                          "(close: ['gsm8k', 'gsm8k_local']"),
    (["model.name=mine"], "model.name=mine: model.name is the model preset's own"),
    (["+cache.name=dual"], "cache.name=dual: cache.name is the cache preset's own"),
])
def test_unknown_group_options_are_named_with_the_options(args, message):
    assert message in unknown_key_message(args)


def test_hydra_launchers_and_sweeps_of_known_options_pass():
    assert unknown_key_message(["-m", "cache=none,d2cache", "hydra/launcher=submitit_local"]) is None
    assert unknown_key_message(["-m", "cache=glob(*)"]) is None  # Hydra's sweep functions are its own


@pytest.mark.parametrize("args, message", [
    (["-m", "cache=choice(none,nosuch)"], "cache=nosuch: no such cache option (close: none; allowed: ['d2cache'"),
    (["-m", "decoding=range(1,3)"], "decoding=1: no such decoding option"),
    (["-m", "+experiment=dkv_table1", "method=choice(none,dkv_dcode)"], "method=dkv_dcode is not a method of experiment"),
    # a glob matching nothing: Hydra would launch no job and exit 0
    (["-m", "cache=glob(zzz*)"], "cache=glob(zzz*): matches no cache option, so no job would run (close: none; allowed: ['d2cache'"),
    (["-m", "seed=range(1,1)"], "seed=range(1,1): a sweep of no values, so no job would run"),
    (["-m", "seed=glob(*)"], "seed=glob(*): a sweep of no values, so no job would run (glob() matches the options of a config group"),
])
def test_sweep_functions_have_each_value_checked(args, message):
    assert message in unknown_key_message(args)


def test_a_glob_sweep_expands_to_the_groups_options():
    """glob(...) needs Hydra's config loader to list a group's options: each job gets one that matches."""
    from dllm.overrides import refused_job_message, sweep_jobs

    assert unknown_key_message(["-m", "cache=glob(non*)", "task.limit=1"]) is None
    assert sweep_jobs(["-m", "cache=glob(non*)", "task.limit=1"]) == [["cache=none", "task.limit=1"]]
    assert refused_job_message(["-m", "cache=glob(non*)", "task.limit=1"]) is None
    assert [job[0] for job in sweep_jobs(["-m", "cache=glob(d*,exclude=[dkv*,dual])"])] == [
        "cache=d2cache", "cache=dllm_cache", "cache=dpad"]
    assert len(sweep_jobs(["-m", "decoding=glob(*)"])) == len(list((ROOT / "conf" / "decoding").glob("*.yaml")))
    assert unknown_key_message(["-m", "+experiment=dkv_table1", "method=choice(none,dkv_decode)"]) is None
    # a sweep the basic sweeper cannot run: Hydra's words, on one line
    assert refused_job_message(["-m", "seed=interval(0,1)"]) == "BasicSweeper does not support sweep type : INTERVAL_SWEEP"


def test_a_missing_preset_in_a_job_is_named_with_its_groups_options():
    from hydra.errors import MissingConfigException

    from dllm.overrides import _composition_message

    err = MissingConfigException("Could not find 'cache/nosuch'\nAvailable options...", "cache/nosuch", ["none", "d2cache"])
    assert _composition_message(err) == "cache=nosuch: no such cache option (close: none; allowed: ['d2cache', 'none'])"


def test_plus_on_an_existing_key_says_to_drop_it():
    assert unknown_key_message(["cache=d2cache", "+cache.k=3"]) == "+cache.k=3: cache.k exists already; drop the '+' (cache.k=3)"
    assert "drop the '+' (seed=1)" in unknown_key_message(["+seed=1"])
    assert unknown_key_message(["cache=d2cache", "++cache.k=3"]) is None  # '++' adds or overrides
    # the other way round: Hydra's own refusal, on one line
    assert unknown_key_message(["experiment=dkv_table1"]) == (
        "Could not override 'experiment'. No match in the defaults list. "
        "To append to your default list use +experiment=dkv_table1")


@pytest.mark.parametrize("args, message", [
    (["+task.limt=4"], "task.limt: task=arith has no key 'limt' (close: ['limit']"),
    (["++task.limt=4"], "task=arith has no key 'limt' (close: ['limit']"),
    (["+model.foo=1"], "model.foo: model=tiny_llada has no key 'foo' (close: none; allowed: ['family'"),
    (["+foo=1"], "foo: the config has no key 'foo' (close: none; allowed: ['batch_size'"),
    (["seedd=1"], "the config has no key 'seedd' (close: ['seed']"),
    (["+modle.path=x"], "the config has no key 'modle' (close: ['model']"),
    (["+logger.wand.project=x"], "logger.wand.project: logger has no key 'wand' (close: ['wandb']; allowed: ['wandb'])"),
    (["timing.repeat=2"], "timing has no key 'repeat' (close: ['repeats']"),
    (["task.mc_num=2"], "task.mc_num: task=arith has no key 'mc_num'; add it with +task.mc_num=2"),
])
def test_mistyped_keys_outside_cache_and_decoding_are_refused(args, message):
    assert message in unknown_key_message(args)


def test_keys_some_preset_or_the_code_has_may_be_added():
    for args in (["+task.mc_num=2"], ["+task.num_return_sequences=2", "+task.pass_k=[1,2]"], ["+task.lm_eval_tasks.raw=x"],
                 ["+model.published.gen_length=64"], ["task=mmlu_local", "task.mc_num=2"]):
        assert unknown_key_message(args) is None, args


def test_every_optional_key_the_code_reads_may_be_added():
    """Found as the code reads them: a key read here but in no preset must still pass the check."""
    code = "\n".join(p.read_text() for p in (ROOT / "dllm").rglob("*.py")) + (ROOT / "conf" / "config.yaml").read_text()
    read = {
        "task": set(re.findall(r'_get\(t, "(\w+)"', code)) | set(re.findall(r"\bcfg\.task\.(\w+)", code))
        | set(re.findall(r"oc\.select:task\.(\w+)", code)),
        "model": set(re.findall(r"\bcfg\.model\.(\w+)", code)),
    }
    assert {"mc_num", "pass_k", "batch_size", "prompts"} <= read["task"] and {"instruct", "revision"} <= read["model"]
    for group, keys in read.items():
        for key in keys - {"name"}:  # a preset's name is its identity: refused (test_unknown_group_options...)
            assert unknown_key_message([f"++{group}.{key}=1"]) is None, (group, key)
        assert keys <= set().union(*preset_keys(group).values())


def test_an_experiments_method_is_checked_and_its_keys_named():
    message = unknown_key_message(["+experiment=dkv_table1", "method=foo"])
    assert message.startswith("method=foo is not a method of experiment=dkv_table1 (close: none; allowed: ['dkv_decode'")
    assert "method=dkv_dcode is not a method" in unknown_key_message(["-m", "+experiment=dkv_table1", "method=none,dkv_dcode"])
    assert "method: the config has no key 'method'" in unknown_key_message(["method=none"])  # no experiment
    # cache is ${methods.${method}.cache}: Hydra refuses cache.refresh_interval=4 through it (and +cache.kk=3
    # replaces the whole cache), so the line names the chosen method's key, not the default method's (none)
    assert unknown_key_message(["+experiment=dkv_table1", "method=dkv_decode", "cache.refresh_interval=4"]) == (
        "cache.refresh_interval: experiment=dkv_table1 sets cache: ${methods.${method}.cache}, which Hydra cannot "
        "override through; set methods.dkv_decode.cache.refresh_interval=4 instead")
    assert "set +methods.dkv_greedy.cache.kk=3 instead" in unknown_key_message(
        ["+experiment=dkv_table1", "method=dkv_greedy", "+cache.kk=3"])
    assert "set model.published.decoding.steps=8 instead" in unknown_key_message(
        ["model=tiny_sdar", "+experiment=published", "decoding.steps=8"])
    assert unknown_key_message(["+experiment=dkv_table1", "method=dkv_decode", "methods.dkv_decode.cache.refresh_interval=4"]) is None
    assert "methods.dkv_decode.cache has no key 'refresh_intervl' (close: ['refresh_interval']" in unknown_key_message(
        ["+experiment=dkv_table1", "methods.dkv_decode.cache.refresh_intervl=4"])
    assert unknown_key_message(["+experiment=dkv_table1", "+methods.dkv_decode.cache.window=4"]) is None  # the registry's


def test_published_settings_of_a_preset_without_them_are_refused():
    message = unknown_key_message(["+experiment=published"])
    assert message.startswith("experiment=published uses the model preset's published settings (model.published), "
                              "and model=tiny_llada publishes none (presets that do: ['d3llm_dream'")
    assert "'tiny_sdar'" in message
    assert unknown_key_message(["model=tiny_sdar", "+experiment=published"]) is None
    assert unknown_key_message(["+experiment=block_diffusion_tiny"]) is None


def run_py(tmp_path, *args):
    env = subprocess_env(tmp_path)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"results_csv={tmp_path / 'runs.csv'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_setting_an_experiment_lacks_for_the_task_is_named_with_the_ones_it_has(tmp_path, monkeypatch):
    from conftest import compose

    from dllm.eval.runner import run_eval

    monkeypatch.chdir(tmp_path)
    cfg = compose("+experiment=dkv_table1", "task=arith", "model=tiny_llada", f"results_csv={tmp_path / 'runs.csv'}")
    with pytest.raises(ValueError) as refused:
        run_eval(cfg)
    assert str(refused.value) == (
        "+experiment=dkv_table1: decodings.low_confidence.steps reads paper.gen_length.arith, which is not set: "
        "paper.gen_length has no entry 'arith' (allowed: gsm8k, math, humaneval, mbpp)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["-m", "cache=none,nosuch"], "error: cache=nosuch: no such cache option (close: none; allowed: ['d2cache'"),
    (["-m", "cache=choice(none,nosuch)"], "error: cache=nosuch: no such cache option (close: none; allowed: ['d2cache'"),
    (["-m", "cache=glob(zzz*)"], "error: cache=glob(zzz*): matches no cache option, so no job would run"),
    (["+experiment=dkv_table1", "method=foo"], "error: method=foo is not a method of experiment=dkv_table1"),
    # an experiment's per-task table without the task: named, not OmegaConf's three lines
    (["-m", "+experiment=dkv_table1", "task=arith"], "error: job 1 of 5 (task=arith method=none_random "
                                                    "+experiment=dkv_table1 results_csv="),
    # a bad value among good ones: refused before the first job runs (no row is written)
    (["-m", "seed=7,-1", "task.limit=1", "threads=1"], "error: job 2 of 2 (seed=-1 task.limit=1 threads=1 results_csv="),
    # ... what a run checks after its resume check: the lm-eval task, a local checkpoint's tokenizer
    (["-m", "task.lm_eval_task=arith,nosuch_task", "task.limit=1", "threads=1"],
     "error: job 2 of 2 (task.lm_eval_task=nosuch_task task.limit=1 threads=1 results_csv="),
    (["-m", "model.path={assets}/tiny_llada,{no_tokenizer}", "task.limit=1", "threads=1"], "error: job 2 of 2 (model.path="),
    (["gen_length=32)"], "error: gen_length=32): not an override Hydra can read"),
    (["task.metric=acc,none"], "error: task.metric=acc,none: a comma-separated value is a sweep; add -m"),
])
def test_run_py_prints_one_error_line_and_exits_2(tmp_path, args, message):
    no_tokenizer = tmp_path / "no_tokenizer"  # the checkpoint's config.json and weights, not its tokenizer
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).symlink_to(ROOT / "assets" / "tiny_llada" / name)
    args = [arg.format(assets=ROOT / "assets", no_tokenizer=no_tokenizer) for arg in args]
    done = run_py(tmp_path, *args)
    assert (done.returncode, done.stderr.count("\n")) == (2, 1), done.stderr
    assert done.stderr.startswith(message)
    assert not (tmp_path / "runs.csv").exists()


def test_a_sweeps_jobs_are_the_basic_sweepers():
    """The experiment's hydra.sweeper.params first, then the command line: every combination."""
    from dllm.overrides import sweep_jobs

    jobs = sweep_jobs(["-m", "+experiment=tiny_sweep", "seed=0,1", "hydra/launcher=local", "hydra.sweep.dir=x"])
    assert len(jobs) == 8 and jobs[0] == ["cache=none", "gen_length=16", "+experiment=tiny_sweep", "seed=0"]
    assert {tuple(job[:2]) for job in jobs} == {(f"cache={c}", f"gen_length={g}") for c in ("none", "dkv_decode")
                                               for g in (16, 32)}


def test_sweep_values_set_as_hydra_settings_are_jobs_too():
    """hydra.sweeper.params.<key>=... on the command line sweeps as the experiment's own params do
    (and over them), so the pre-check sees each of its values."""
    from dllm.overrides import refused_job_message, sweep_jobs

    jobs = sweep_jobs(["-m", "+experiment=tiny_sweep", "hydra.sweeper.params.cache=none", "+hydra.sweeper.params.seed='0,-1'"])
    assert len(jobs) == 4 and {job[0] for job in jobs} == {"cache=none"}
    assert {job[2] for job in jobs} == {"seed=0", "seed=-1"}
    assert "seed=-1 must be an integer >= 0" in refused_job_message(["-m", "hydra.sweeper.params.seed=0,-1"])


def test_run_py_inspecting_the_config_is_not_checked(tmp_path):
    """`--cfg job` prints the experiment even where a run of it would be refused."""
    done = run_py(tmp_path, "--cfg", "job", "+experiment=published")
    assert done.returncode == 0 and "experiment: published" in done.stdout, done.stderr


def test_a_launcher_that_cannot_run_from_here_is_one_line(monkeypatch):
    """Without the [slurm] extra Hydra printed 8 lines ("Could not load 'hydra/launcher/submitit_slurm'"),
    without SLURM submitit a 28-line traceback ("Could not detect srun"); both are one line now."""
    import dllm.overrides as overrides

    monkeypatch.setattr(overrides.shutil, "which", lambda name: None)
    assert unknown_key_message(["-m", "hydra/launcher=slurm_cpu", "cache=none"]) == (
        "hydra/launcher=slurm_cpu submits the jobs with SLURM's sbatch, which is not on this machine's PATH: submit "
        "from a SLURM login node, or run the sweep here with hydra/launcher=local")
    assert unknown_key_message(["-m", "hydra/launcher=local"]) is None  # submitit's local launcher needs no SLURM
    monkeypatch.setattr(overrides.importlib.util, "find_spec", lambda name: None)
    for launcher in ("slurm", "local"):
        assert unknown_key_message(["-m", f"hydra/launcher={launcher}"]) == (
            f"hydra/launcher={launcher} needs hydra-submitit-launcher, which is not installed: pip install -e '.[slurm]'")
