"""Sweeps: paper experiments compose to the papers' settings, resume skips finished runs, the
local and SLURM launchers run a sweep end to end, data-parallel evaluation equals one process,
and the aggregate / plot scripts turn the committed example results into tables and figures.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "conf" / "experiment"
PUBLISHED = ROOT / "results" / "published.csv"
EXAMPLE_RUNS = ROOT / "results" / "reference" / "example_runs.csv"
sys.path.insert(0, str(ROOT / "scripts"))

import aggregate  # noqa: E402
from conftest import subprocess_env  # noqa: E402

class Paper(NamedTuple):
    """The published table a paper experiment reproduces (results/published.csv's source)."""

    source: str
    left_out: frozenset = frozenset()  # the table's tasks or methods the experiment does not run (why: its header)
    partial: bool = False  # the source gives only some (model, task, length) settings of the grid (a highlights page)


PAPER_EXPERIMENTS = {
    "d2cache_table1": Paper("d2cache_v1_table1"),
    "dkv_table1": Paper("dkv_table1", frozenset({"mmlu"})),
    "dkv_table2": Paper("dkv_table2"),
    "elastic_table1": Paper("elastic_webpage", partial=True),
    "sparse_dllm_table1": Paper("sparse_dllm_table1", frozenset({
        "mmlu", "arc_c", "piqa", "gpqa",  # generated MMLU / no task here
        "dllm_cache", "dkv_cache", "fast_dllm",  # baselines whose settings the table does not give
    })),
    "streaming_table2": Paper("streaming_table2", frozenset({"dkv_cache"})),  # variant / interval not given
    "dpad_main": Paper("dpad_readme"),
}
def test_aggregate_knows_each_paper_experiments_table():
    assert aggregate.PUBLISHED_SOURCE == {name: paper.source for name, paper in PAPER_EXPERIMENTS.items()}


# A published setting's DPad parameters and the cache fields they are.
DPAD_SETTING = {"k": "k_sigma", "a": "scale", "W": "window"}
# dLLM-Cache's Kp/Kr per (task, model) in d²Cache's Table 1.
KP_KR = {
    ("gsm8k", "llada"): (50, 7), ("gsm8k", "dream"): (25, 2),
    ("humaneval", "llada"): (25, 5), ("humaneval", "dream"): (50, 1),
    ("math", "llada"): (50, 1), ("math", "dream"): (50, 1),
    ("mbpp", "llada"): (100, 5), ("mbpp", "dream"): (10, 8),
}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done


# ----------------------------------------------------------------------------------------------
# Experiment configs: compose, pass the pre-load checks, match the papers' settings
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def composer():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield compose


def sweep_cells(compose, experiment: str) -> list[dict]:
    """The experiment's grid (hydra.sweeper.params) as override dicts."""
    cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def compose_cell(compose, experiment: str, cell: dict):
    overrides = [f"+experiment={experiment}", *(f"{k}={v}" for k, v in cell.items()), "task.allow_code_execution=true"]
    cfg = compose("config", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def compose_grid(compose, experiment: str) -> list:
    """Every cell of the grid, resolved. Cells that differ only in the plain ``method`` key share
    one composition (the experiment's cache/decoding interpolate ``${methods.${method}...}``)."""
    cells = sweep_cells(compose, experiment)
    groups: dict[tuple, list[str]] = {}
    for cell in cells:
        rest = tuple((k, v) for k, v in cell.items() if k != "method")
        groups.setdefault(rest, []).append(cell.get("method"))
    out = []
    for rest, methods in groups.items():
        overrides = [f"+experiment={experiment}", *(f"{k}={v}" for k, v in rest), "task.allow_code_execution=true"]
        base = compose("config", overrides=overrides)
        for method in methods:
            cfg = base.copy()
            if method is not None:
                cfg.method = method
            OmegaConf.resolve(cfg)
            out.append(cfg)
    assert len(out) == len(cells)
    return out


def pseudo_row(cfg) -> dict:
    """The CSV row fields aggregate.py labels methods from."""
    row = {"cache": cfg.cache.name, "decoding": cfg.decoding.name}
    row.update({f"cache.{k}": v for k, v in cfg.cache.items() if k != "name"})
    return row


def test_every_experiment_composes_on_the_command_line(tmp_path):
    names = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
    assert {"tiny_sweep", *PAPER_EXPERIMENTS} <= set(names)
    env = subprocess_env(tmp_path)
    for name in names:
        done = run([sys.executable, "run.py", "--cfg", "job", f"+experiment={name}"], env, timeout=120)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        job = OmegaConf.create(done.stdout)
        assert job.experiment == name
        assert "# @package _global_" in (EXPERIMENTS / f"{name}.yaml").read_text().splitlines()[0]


@pytest.mark.parametrize("experiment", sorted(PAPER_EXPERIMENTS))
def test_paper_experiment_matches_the_published_table(composer, experiment):
    """Every cell of the grid passes the pre-load checks, each published row (but the left-out ones)
    is exactly one cell of the grid (model, task, method; gen_length and decoding where its setting
    names them), with the row's n_shot, gen_length, steps, and every cell is a published row."""
    from dllm.eval.runner import check_task
    from dllm.pipeline import plan_run

    source, left_out, partial = PAPER_EXPERIMENTS[experiment]
    published = [r for r in read_rows(PUBLISHED) if r["source"] == source and not {r["task"], r["method"]} & left_out]
    assert published
    produced = {}  # (model, task, method, gen_length, decoding) -> the cell's config
    for cfg in compose_grid(composer, experiment):
        settings = check_task(cfg)
        plan = plan_run(cfg)  # decoder / cache build and their checks: every cell would start
        assert cfg.experiment == experiment and cfg.batch_size == 1
        assert plan.gen_length == cfg.task.gen_length
        model = aggregate.PUBLISHED_MODEL[cfg.model.name]
        task = aggregate.published_task(cfg.task.name, settings.lm_eval_task)
        method = aggregate.paper_method(pseudo_row(cfg))
        key = (model, task, method, cfg.gen_length, cfg.decoding.name)
        assert key not in produced, f"two cells make the same row {key}"
        produced[key] = cfg
        if cfg.cache.name == "dllm_cache":
            assert (cfg.cache.prompt_interval, cfg.cache.response_interval) == KP_KR[(cfg.task.name, cfg.model.name)]
            assert cfg.cache.update_ratio == 0.25
        if cfg.cache.name == "d2cache":
            assert (cfg.cache.k, cfg.cache.p, cfg.cache.sigma) == (32, 0.1, 10.0)
            assert cfg.decoding.name == "certainty_prior"
        if cfg.cache.name in ("none", "dllm_cache", "prefix") and experiment == "d2cache_table1":
            assert cfg.decoding.name == "low_confidence" and cfg.decoding.block_length == 32
        assert cfg.decoding.temperature == 0.0
    if partial:  # only the (model, task, length) settings the source gives
        given = {(p["model"], p["task"], int(re.search(r"L=(\d+)", p["setting"]).group(1))) for p in published}
        produced = {k: cfg for k, cfg in produced.items() if (k[0], k[1], k[3]) in given}
    matched = set()
    for p in published:
        length, decoding = re.search(r"L=(\d+)", p["setting"]), aggregate.published_decoding(p["setting"])
        cells = [k for k in produced if k[:3] == (p["model"], p["task"], p["method"])
                 and (length is None or k[3] == int(length.group(1))) and decoding in (None, k[4])]
        assert len(cells) == 1, f"{experiment}: published row {p['model'], p['task'], p['method'], p['setting']} is cells {cells}"
        matched.add(cells[0])
        cfg = produced[cells[0]]
        shots = re.search(r"(\d+)-shot", p["setting"])
        if shots:
            assert cfg.task.n_shot == int(shots.group(1)), cells[0]
        steps = re.search(r"T=(\d+)", p["setting"])
        if steps:
            assert cfg.decoding.steps == int(steps.group(1)), cells[0]
        for name, value in re.findall(r"\b([kaW])=([\d.]+)", p["setting"]):
            assert float(cfg.cache[DPAD_SETTING[name]]) == float(value), (cells[0], name)
    assert set(produced) == matched, f"cells without a published row: {set(produced) - matched}"


def test_experiment_headers_state_the_paper_settings():
    d2 = (EXPERIMENTS / "d2cache_table1.yaml").read_text()
    for line in (r"GSM8K\s+4\s+256", r"MBPP\s+3\s+512", r"HumanEval\s+0\s+512", r"MATH-500\s+4\s+256"):
        assert re.search(line, d2), line
    for (task, model), (kp, kr) in KP_KR.items():
        assert f"{kp}/{kr}" in d2
    assert re.search(r"GSM8K\s+50/7\s+25/2", d2) and re.search(r"MBPP\s+100/5\s+10/8", d2)
    t2 = (EXPERIMENTS / "dkv_table2.yaml").read_text()
    for line in (r"GSM8K\s+8\s+256\s+256", r"MBPP\s+3\s+512\s+512", r"HumanEval\s+0\s+512\s+512"):
        assert re.search(line, t2), line
    t1 = (EXPERIMENTS / "dkv_table1.yaml").read_text()
    assert "0-shot" in t1 and "R=2" in t1 and "w=4" in t1 and "w=2 on MBPP" in t1 and "R=8" in t1


def test_tiny_sweep_is_two_caches_by_two_settings(composer):
    cells = sweep_cells(composer, "tiny_sweep")
    assert len(cells) == 4 and {c["cache"] for c in cells} == {"none", "dkv_decode"}
    for cell in cells:
        cfg = compose_cell(composer, "tiny_sweep", cell)
        assert cfg.model.tiny and cfg.device == "cpu"


def test_published_numbers_are_copied_verbatim():
    shared = Path("/work/shared/reference/published_results.csv")
    if not shared.exists():
        pytest.skip("the shared reference copy is not on this machine")
    # The shared copy holds the first papers' tables; the later sources (elastic_webpage, ...) were
    # added here: its header and its sources' rows are ours, verbatim and in order.
    header, *rows = shared.read_text().splitlines()
    ours = PUBLISHED.read_text().splitlines()
    sources = {row.split(",", 1)[0] for row in rows}
    assert ours[0] == header
    assert [row for row in ours[1:] if row.split(",", 1)[0] in sources] == rows


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
def test_resume_skips_existing_rows_before_loading_and_force_reruns(monkeypatch, tmp_path, composer):
    """The key computed before the load equals record_key of the written row (an experiment run
    with W&B, grouped by the experiment; a task that fixes its shot count); force=true runs again."""
    import dllm.pipeline
    from dllm.eval import runner
    from dllm.logging import sinks
    from dllm.logging.record import record_key

    groups = []

    class WandbRecorder:
        def __init__(self, **kwargs):
            groups.append(kwargs["group"])

        def log(self, *a, **k):
            return None

    monkeypatch.setattr(sinks, "WandbSink", WandbRecorder)
    monkeypatch.chdir(tmp_path)
    csv_path = tmp_path / "runs.csv"
    base = [f"results_csv={csv_path}", "model=tiny_llada", "device=cpu", "task.limit=1", "gen_length=16", "decoding.block_length=16"]
    cells = [
        ["+experiment=tiny_sweep", "cache=dkv_decode", "logger=wandb"],
        ["task=humaneval_local", "task.n_shot=1", "task.allow_code_execution=true"],  # runs 0-shot
    ]
    rows = [runner.run_eval(composer("config", overrides=base + c)) for c in cells]
    assert [r["n_shot"] for r in rows] == [0, 0] and rows[0]["experiment"] == "tiny_sweep"
    assert groups == ["tiny_sweep"]  # W&B: a sweep's runs are grouped by experiment
    written = read_rows(csv_path)
    assert [record_key(r) for r in written] == [record_key(r) for r in rows]

    loads = []
    load = dllm.pipeline.load_model_and_tokenizer
    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", lambda *a, **k: loads.append(1) or load(*a, **k))
    for c in cells:
        assert runner.run_eval(composer("config", overrides=base + c)) is None  # skip (exists)
    assert loads == [] and len(read_rows(csv_path)) == 2
    again = runner.run_eval(composer("config", overrides=base + cells[1] + ["force=true"]))
    assert loads == [1] and again["run_id"] != rows[1]["run_id"]
    assert len(read_rows(csv_path)) == 3


# Every override here can change a number: each must give another resume key.
KEY_CHANGES = [
    ["model.instruct=false"], ["task.metric='exact_match,strict-match'"],
    ["task.lm_eval_task=gsm8k_local_cot"], ["task.include_path=arith"], ["+task.mc_num=2"], ["task.n_shot=3"],
    ["dtype=bfloat16"], ["gen_length=32", "decoding.block_length=32"], ["batch_size=2"], ["seed=1"],
    ["cache=dkv_decode"], ["decoding.temperature=0.5"], ["task.limit=3"], ["model=tiny_llada_random"],
    ["compile=true"], ["task.cut_at_eos=false"], ["task.cut_at_until=false"],
]
# ... and these cannot: the key stays.
KEY_KEEPS = [["results_csv=/elsewhere/runs.csv"], ["force=true"], ["logger=wandb"], ["device=cpu"], ["dtype=float32"], ["debug=true"],
             ["task.cut_at_eos=true"], ["task.cut_at_until=true"]]


def _key(composer, *overrides) -> str:
    from dllm.eval.runner import _identity, check_task
    from dllm.pipeline import plan_run

    cfg = composer("config", overrides=["task=gsm8k_local", "device=auto", *overrides])
    return _identity(cfg, check_task(cfg), plan_run(cfg))["run_key"]


def test_resume_key_covers_every_setting_that_can_change_a_number(composer, tmp_path):
    base = _key(composer)
    changed = {" ".join(change): _key(composer, *change) for change in KEY_CHANGES}
    assert [name for name, key in changed.items() if key == base] == []
    assert len(set(changed.values())) == len(changed)
    assert [keep for keep in KEY_KEEPS if _key(composer, *keep) != base] == []

    # Another checkpoint under the same preset name: another folder, or the same folder whose
    # config.json changed (retrained with other shapes, say).
    folder = tmp_path / "ckpt"
    shutil.copytree(ROOT / "assets" / "tiny_llada", folder)
    copied = _key(composer, f"model.path={folder}")
    assert copied not in (base, *changed.values())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 10000.0}))
    reconfigured = _key(composer, f"model.path={folder}")
    assert reconfigured != copied
    # ... or the same folder and config.json with other weights (retrained in place)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert _key(composer, f"model.path={folder}") != reconfigured


def test_resume_key_has_the_thread_count_and_the_files_parameters_name(composer, tmp_path, monkeypatch):
    """threads=auto enters resolved (another machine's count is another speed); a file a decoding
    parameter names enters by its content."""
    from dllm.pipeline import resolve_threads

    monkeypatch.setattr("os.cpu_count", lambda: 64)  # room for threads + 1 on any machine
    threads = resolve_threads("auto")
    assert _key(composer, "threads=auto") == _key(composer, f"threads={threads}") != _key(composer, f"threads={threads + 1}")
    frequencies = tmp_path / "frequencies.json"
    frequencies.write_text(json.dumps({"5": 3, "6": 1}))
    first = _key(composer, "decoding=pc_sampler", f"decoding.frequencies={frequencies}")
    assert first == _key(composer, "decoding=pc_sampler", f"decoding.frequencies={frequencies}")
    frequencies.write_text(json.dumps({"5": 1, "6": 3}))
    assert _key(composer, "decoding=pc_sampler", f"decoding.frequencies={frequencies}") != first
    # named from the home folder (~), as the decoder reads it: its content enters too
    monkeypatch.setenv("HOME", str(tmp_path))
    home = _key(composer, "decoding=pc_sampler", "decoding.frequencies='~/frequencies.json'")
    frequencies.write_text(json.dumps({"5": 2, "6": 2}))
    assert _key(composer, "decoding=pc_sampler", "decoding.frequencies='~/frequencies.json'") != home


def test_resume_key_reads_equal_settings_alike_and_sees_task_folders_and_processes(composer, tmp_path, monkeypatch):
    """An integer for a float parameter, the response length set at the top or in the task: one run.
    A task folder of one's own enters by its resolved path and its files; data-parallel runs by
    their process count."""
    from dllm.eval.runner import _identity, check_task
    from dllm.pipeline import plan_run

    base = _key(composer)
    assert _key(composer, "decoding.temperature=0") == base  # the preset's 0.0
    assert _key(composer, "decoding.cfg_scale=0") == base != _key(composer, "decoding.cfg_scale=1")  # the loop's option too
    assert _key(composer, "gen_length=32", "decoding.block_length=32") == _key(
        composer, "task.gen_length=32", "decoding.block_length=32")
    assert _key(composer, "task=arith", "batch_size=5") == _key(composer, "task=arith", "task.batch_size=5") != _key(
        composer, "task=arith")  # arith's own is 20
    own = tmp_path / "a" / "mytasks"
    shutil.copytree(ROOT / "dllm" / "eval" / "tasks" / "local", own)
    monkeypatch.chdir(tmp_path / "a")
    first = _key(composer, "task.include_path=mytasks")
    assert first != _key(composer, "task.include_path=local")
    bundled = ROOT / "dllm" / "eval" / "tasks" / "local"  # a bundled folder by its path is the same folder
    assert _key(composer, f"task.include_path={bundled}") == _key(composer, "task.include_path=local")
    shutil.copytree(own, tmp_path / "b" / "mytasks")
    monkeypatch.chdir(tmp_path / "b")
    assert _key(composer, "task.include_path=mytasks") != first  # another folder of the same name
    assert _key(composer, f"task.include_path={own}") == first
    task_file = next(own.rglob("*.yaml"))
    task_file.write_text(task_file.read_text() + "\n# edited\n")
    assert _key(composer, f"task.include_path={own}") != first  # the same folder, its files changed
    cfg = composer("config", overrides=["task=gsm8k_local", "device=auto"])
    two = _identity(cfg, check_task(cfg), plan_run(cfg), processes=2)
    assert two["processes"] == 2 and two["run_key"] != base


def test_resume_key_sees_the_files_outside_a_task_folder_that_its_yamls_read(composer, tmp_path, monkeypatch):
    """A task folder of one's own whose YAML includes another YAML and reads data files elsewhere
    (by absolute path, from the working directory, by glob, under a local dataset_path): editing
    any of them is another task set; editing a file no YAML names is not."""
    from dllm.eval.runner import files_read_by

    shared, data, work = tmp_path / "shared", tmp_path / "data", tmp_path / "work"
    for folder in (shared, data / "local_set", work / "rel", tmp_path / "mytasks"):
        folder.mkdir(parents=True)
    (shared / "base.yaml").write_text("output_type: generate_until\ndoc_to_text: '{{question}}'\n")
    files = {name: data / name for name in ("test.jsonl", "a_0.jsonl", "a_1.jsonl", "unnamed.jsonl")}
    files["rel"] = work / "rel" / "test.jsonl"
    files["under_path"] = data / "local_set" / "test.jsonl"
    for path in files.values():
        path.write_text('{"question": "1+1", "answer": "2"}\n')
    (tmp_path / "mytasks" / "mytask.yaml").write_text(
        f"include: ../shared/base.yaml\ntask: mytask\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {files['test.jsonl']}\n    train: [rel/test.jsonl, {data}/a_*.jsonl]\n"
        f"custom: !function utils.f\n")
    (tmp_path / "mytasks" / "other.yaml").write_text(f"task: other\ndataset_path: {data / 'local_set'}\n"
                                                     "dataset_kwargs:\n  data_files: test.jsonl\n")
    (tmp_path / "mytasks" / "broken.yaml").write_text("task: [unclosed\n")
    monkeypatch.chdir(work)
    read = files_read_by(tmp_path / "mytasks")
    assert {files[n] for n in ("test.jsonl", "a_0.jsonl", "a_1.jsonl", "rel", "under_path")} | {
        shared / "base.yaml", data / "local_set"} <= read
    assert files["unnamed.jsonl"] not in read
    include = f"task.include_path={tmp_path / 'mytasks'}"
    first = _key(composer, include)
    files["unnamed.jsonl"].write_text("{}\n")
    assert _key(composer, include) == first
    keys = {first}
    for path in (shared / "base.yaml", *(files[n] for n in ("test.jsonl", "a_1.jsonl", "rel", "under_path"))):
        path.write_text(path.read_text() + "\n")
        keys.add(_key(composer, include))
    assert len(keys) == 6  # each edit, another key


def test_resume_key_of_a_hub_checkpoint_has_the_commit_its_revision_resolves_to(composer, tmp_path, monkeypatch):
    """A Hub id without model.revision is whatever main is now: a main that moved on is another
    model (the HF cache here, offline: refs/main names the snapshot)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--fake--tiny"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        shutil.copytree(ROOT / "assets" / "tiny_llada", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    keys = []
    for commit in commits:
        (repo / "refs" / "main").write_text(commit)
        keys.append(_key(composer, "model.path=fake/tiny"))
    assert keys[0] != keys[1]
    assert _key(composer, "model.path=fake/tiny", f"model.revision={commits[0]}") == keys[0]
    from dllm.eval.runner import _identity, check_task
    from dllm.pipeline import config_sha256, plan_run

    cfg = composer("config", overrides=["task=gsm8k_local", "model.path=fake/tiny"])
    identity = _identity(cfg, check_task(cfg), plan_run(cfg))
    assert identity["checkpoint"] == "fake/tiny" and identity["checkpoint_revision"] == commits[1]
    assert identity["checkpoint_config_sha256"] == config_sha256(ROOT / "assets" / "tiny_llada")


def test_resume_key_of_a_random_tiny_model_has_its_recipe_version(composer, monkeypatch):
    import dllm.models.tiny

    first = _key(composer, "model=tiny_llada_random")
    monkeypatch.setattr(dllm.models.tiny, "CACHE_VERSION", "v0")
    assert _key(composer, "model=tiny_llada_random") != first


def test_record_names_the_lm_eval_task_and_the_checkpoint(composer):
    from dllm.eval.runner import _identity, check_task
    from dllm.pipeline import config_sha256, plan_run

    cfg = composer("config", overrides=["task=humaneval_local", "task.allow_code_execution=true"])
    identity = _identity(cfg, check_task(cfg), plan_run(cfg))
    folder = ROOT / "assets" / "tiny_llada"
    assert identity["task"] == "humaneval_local" and identity["lm_eval_task"] == "humaneval_local_sanitized"
    assert identity["code_scoring"] == "sanitize"  # tiny_llada is an instruct model
    assert identity["checkpoint"] == str(folder.resolve())
    assert identity["checkpoint_config_sha256"] == config_sha256(folder) and len(config_sha256(folder)) == 64


FAIL_ONE_JOB = """
import runpy, sys
import dllm.eval.runner as runner
evaluate = runner._evaluate
def killed(cfg, *args, **kwargs):
    if cfg.cache.name == "dkv_decode" and cfg.gen_length == 32:
        raise RuntimeError("simulated: job killed half-way")
    return evaluate(cfg, *args, **kwargs)
runner._evaluate = killed
sys.argv = ["run.py", *sys.argv[1:]]
runpy.run_path("run.py", run_name="__main__")
"""


def test_a_killed_sweep_reruns_only_the_missing_run(tmp_path):
    """4-job sweep, one job dies after the others wrote their rows; re-running the same sweep
    (this time through submitit's local launcher) runs only that job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [slurm] extra (hydra-submitit-launcher)")
    env = subprocess_env(tmp_path)
    csv_path = tmp_path / "runs.csv"
    sweep = ["-m", "+experiment=tiny_sweep", "task.limit=1", f"results_csv={csv_path}"]
    first = run([sys.executable, "-c", FAIL_ONE_JOB, *sweep, f"hydra.sweep.dir={tmp_path / 'first'}"], env)
    assert first.returncode != 0 and "simulated: job killed half-way" in first.stderr
    before = read_rows(csv_path)
    assert sorted((r["cache"], r["gen_length"]) for r in before) == [("dkv_decode", "16"), ("none", "16"), ("none", "32")]

    second = run([sys.executable, "run.py", *sweep, "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'second'}"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    after = read_rows(csv_path)
    assert after[:3] == before  # untouched
    assert [(r["cache"], r["gen_length"], r["status"]) for r in after[3:]] == [("dkv_decode", "32", "ok")]
    logs = "".join(p.read_text() for p in (tmp_path / "second" / ".submitit").glob("*_log.*"))
    assert logs.count("skip (exists)") == 3
    assert not list((tmp_path / "second").glob("**/%j"))  # the local preset sets the folder


# ----------------------------------------------------------------------------------------------
# Data parallel: torchrun with 2 gloo processes == 1 process
# ----------------------------------------------------------------------------------------------
def test_torchrun_two_ranks_match_one_process(tmp_path):
    env = subprocess_env(tmp_path)
    common = ["task=arith", "task.limit=3", "batch_size=1", "gen_length=16", "decoding.block_length=16", "device=cpu", f"results_csv={tmp_path / 'runs.csv'}"]
    one = run([sys.executable, "run.py", *common, f"hydra.run.dir={tmp_path / 'one'}"], env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "run.py", *common,
         "force=true", f"hydra.run.dir={tmp_path / 'two'}"],
        env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    rows = read_rows(tmp_path / "runs.csv")
    assert len(rows) == 2  # one record per run: rank 0 writes
    single, parallel = rows
    for field in ("accuracy", "n_samples", "useful_tokens", "all_tokens", "nfe", "recompute_ratio"):
        assert single[field] == parallel[field], field
    # Throughput = tokens over ranks / the longest rank's generation time.
    assert float(parallel["throughput_all_tok_s"]) == pytest.approx(int(parallel["all_tokens"]) / float(parallel["gen_seconds"]))

    def generations(name):
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        return {s["doc_id"]: (s["generation"], s["correct"]) for s in map(json.loads, lines)}

    assert generations("one") == generations("two") and len(generations("two")) == 3


# ----------------------------------------------------------------------------------------------
# aggregate.py and plot.py on the committed example results
# ----------------------------------------------------------------------------------------------
def test_aggregate_writes_one_row_per_method(tmp_path):
    assert EXAMPLE_RUNS.exists(), "results/reference/example_runs.csv is committed (README: Results and figures)"
    assert aggregate.main([str(EXAMPLE_RUNS), "--out", str(tmp_path), "--published", str(PUBLISHED)]) == 0
    for name in ("tables.md", "tables.tex", "summary.csv"):
        assert (tmp_path / name).stat().st_size > 0
    runs = aggregate.load_runs(EXAMPLE_RUNS)
    tables = aggregate.build_tables(runs)
    assert tables
    for key, table in tables:
        group = runs[(runs[aggregate.TABLE_KEYS] == pd_series(key)).all(axis=1)]
        methods = {tuple(sorted((k, v) for k, v in r.items() if k in ("cache", "decoding") or k.startswith(("cache.", "decoding."))))
                   for r in group.to_dict("records")}
        assert len(table) == len(methods) == table["method"].nunique(), key
        assert table.loc[table["cache"] == "none", "speedup"].tolist() == [1.0] * int((table["cache"] == "none").sum())
    tex = (tmp_path / "tables.tex").read_text()
    assert tex.count(r"\toprule") == len(tables) == tex.count(r"\bottomrule")
    md = (tmp_path / "tables.md").read_text()
    assert md.count("### ") == len(tables)


def pd_series(key: dict):
    import pandas as pd

    return pd.Series({k: key[k] for k in aggregate.TABLE_KEYS})


def test_aggregate_puts_published_numbers_beside_ours(tmp_path):
    """Rows of a (fake) d2cache_table1 LLaDA GSM8K run pick up the paper's numbers."""
    from dllm.logging.record import RunRecord
    from dllm.logging.sinks import append_csv

    path = tmp_path / "runs.csv"
    specs = [
        ("none", {}, "low_confidence", 10.0), ("prefix", {"refresh_interval": None}, "low_confidence", 30.0),
        ("dllm_cache", {"prompt_interval": 50, "response_interval": 7, "update_ratio": 0.25}, "low_confidence", 25.0),
        ("d2cache", {"k": 32, "p": 0.1, "sigma": 10.0}, "certainty_prior", 35.0),
    ]
    for cache, params, decoding, tok_s in specs:
        append_csv(path, RunRecord(
            model="llada", cache=cache, cache_params=params, decoding=decoding, task="gsm8k", n_shot=4, gen_length=256,
            batch_size=1, seed=0, device="cuda", gpu_name="H100", accuracy=0.78, accuracy_stderr=0.01, n_samples=1319,
            gen_seconds=256 * 1319 / tok_s, throughput_useful_tok_s=tok_s, throughput_all_tok_s=tok_s, latency_s_mean=1.0,
            ideal_speedup=2.0,
        ).to_row())
    ((key, table),) = aggregate.build_tables(aggregate.load_runs(path), aggregate.load_published(PUBLISHED))
    paper = dict(zip(table["method"], zip(table["paper acc"], table["paper speedup"])))
    assert paper == {"none": (77.6, 1.0), "dllm_cache": (76.8, 3.0), "prefix": (77.0, 3.5), "d2cache": (79.2, 3.1)}
    assert dict(zip(table["method"], table["speedup"])) == pytest.approx({"none": 1.0, "dllm_cache": 2.5, "prefix": 3.0, "d2cache": 3.5})


def test_plot_writes_every_figure(tmp_path, monkeypatch):
    import plot

    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    out = tmp_path / "figures"
    code = plot.main([str(EXAMPLE_RUNS), "--trace", "--gen-length", "16", "--block-length", "8", "--out", str(out),
                      "--published", str(PUBLISHED)])
    assert code == 0
    names = {"accuracy_vs_throughput", "speedup", "recompute_map"}
    for name in names:
        for ext in ("pdf", "png"):
            path = out / f"{name}.{ext}"
            assert path.stat().st_size > 1000, path
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    committed = ROOT / "results" / "reference" / "figures"
    assert {p.name for p in committed.glob("*.png")} >= {f"{n}.png" for n in names}


def test_pareto_front():
    import plot

    points = [(1.0, 50.0), (2.0, 40.0), (1.5, 45.0), (0.5, 60.0), (1.0, 40.0)]
    assert plot.pareto_front(points) == [3, 0, 2, 1]


# ----------------------------------------------------------------------------------------------
# SLURM: a real single-node cluster (scripts/slurm_local.sh), the tiny sweep through hydra/launcher=slurm
# ----------------------------------------------------------------------------------------------
def _sinfo_ok() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def slurm_cluster():
    """An idle SLURM partition: an existing one when DLLM_TEST_SLURM=1, else the local single-node
    cluster of scripts/slurm_local.sh (root, packages installed: `scripts/slurm_local.sh install`)."""
    # .ci/run sets DLLM_REQUIRE_SLURM=1 where it installed SLURM: there a missing cluster is a failure.
    skip = pytest.fail if os.environ.get("DLLM_REQUIRE_SLURM") == "1" else pytest.skip
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        skip("needs the [slurm] extra (hydra-submitit-launcher)")
    if os.environ.get("DLLM_TEST_SLURM") == "1" and _sinfo_ok():
        yield "existing"
        return
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        skip("SLURM is not installed: `sudo scripts/slurm_local.sh install` (Debian slurm-wlm, as .ci/run does)")
    if os.geteuid() != 0:
        skip("starting the local SLURM daemons needs root (or set DLLM_TEST_SLURM=1 to use a running cluster)")
    helper = ROOT / "scripts" / "slurm_local.sh"
    up = subprocess.run([str(helper), "up"], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    try:
        yield "local"
    finally:
        subprocess.run([str(helper), "down"], capture_output=True, text=True, timeout=120)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_tiny_sweep_on_slurm(slurm_cluster, tmp_path):
    env = subprocess_env(tmp_path)
    csv_path = tmp_path / "runs.csv"
    command = [
        sys.executable, "run.py", "-m", "+experiment=tiny_sweep", "hydra/launcher=slurm_cpu", "device=cpu",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3",
        "hydra.launcher.timeout_min=10", f"results_csv={csv_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run(command, env, timeout=540)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    rows = read_rows(csv_path)
    assert sorted((r["cache"], r["gen_length"], r["status"]) for r in rows) == [
        ("dkv_decode", "16", "ok"), ("dkv_decode", "32", "ok"), ("none", "16", "ok"), ("none", "32", "ok"),
    ]
    assert {r["experiment"] for r in rows} == {"tiny_sweep"}
    assert "SLURM sweep: each job appends its row to" in done.stdout  # where the rows will arrive
    assert "sweep done: 4 row(s) written to" in done.stdout  # the summary table at the end
    scripts = list((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))
    assert scripts, "no sbatch scripts: the jobs did not go through SLURM"
    for script in scripts:
        text = script.read_text()
        assert "#SBATCH" in text and sys.executable in text  # the job runs this venv's Python
    job_ids = ",".join({p.name.split("_")[0] for p in scripts})
    for _ in range(60):  # accounting lags the jobs' own exit by a few seconds
        states = subprocess.run(["sacct", "-n", "-X", "-o", "State", "-j", job_ids], capture_output=True, text=True)
        if states.returncode == 0 and set(states.stdout.split()) == {"COMPLETED"}:
            break
        time.sleep(0.5)
    assert set(states.stdout.split()) == {"COMPLETED"}, states.stdout


# d2cache_table1's MBPP: the published run's code post-processed only task ids starting with "mbpp",
# which MBPP's integer ids never do (conf/experiment/d2cache_table1.yaml).
@pytest.mark.parametrize("experiment, humaneval, mbpp", [
    ("d2cache_table1", "sanitize", "raw"), ("dkv_table1", "sanitize", "sanitize"), ("dkv_table2", "raw", "raw"),
])
def test_paper_experiments_pin_their_code_scoring(composer, experiment, humaneval, mbpp):
    from dllm.eval.runner import check_task

    for task, scoring, lm_eval_task in (
        ("humaneval", humaneval, {"sanitize": "dllm_humaneval_sanitized", "raw": "humaneval"}),
        ("mbpp", mbpp, {"sanitize": "dllm_mbpp_sanitized", "raw": "mbpp"}),
    ):
        cfg = composer("config", overrides=[f"+experiment={experiment}", f"task={task}", "task.allow_code_execution=true"])
        settings = check_task(cfg)
        assert (settings.code_scoring, settings.lm_eval_task) == (scoring, lm_eval_task[scoring])
    gsm8k = check_task(composer("config", overrides=[f"+experiment={experiment}", "task=gsm8k"]))
    assert gsm8k.code_scoring is None and gsm8k.lm_eval_task == "gsm8k"


# The Fast-dLLM lineage of evaluation code (DPad, Streaming-dLLM, Elastic-Cache) applies the chat
# template only to a model path with "instruct" in it, keeps the text after an EOS, scores HumanEval by
# postprocess_code.py and MBPP by lm-eval's mbpp; Sparse-dLLM's OpenCompass wrapper has no chat template;
# Dream's side of DPad cuts at the EOS only, not at the stop strings (the experiments' headers).
@pytest.mark.parametrize("experiment, model, chat, cut_at_eos, humaneval, mbpp", [
    ("dpad_main", "llada", True, False, "sanitize_no_prompt", "raw"),
    ("dpad_main", "llada_1_5", False, False, "raw_sanitize_no_prompt", "raw"),
    ("dpad_main", "dream_base", False, True, "sanitize_no_prompt", "raw"),
    ("streaming_table2", "llada_1_5", False, False, "raw_sanitize_no_prompt", "raw"),
    ("elastic_table1", "llada", True, False, "sanitize_no_prompt", "raw"),
    ("elastic_table1", "llada_1_5", False, False, "raw_sanitize_no_prompt", "raw"),
    ("sparse_dllm_table1", "llada", False, False, "raw", None),
    ("sparse_dllm_table1", "llada_1_5", False, False, "raw", None),
])
def test_paper_experiments_prompt_and_score_as_their_authors_code(composer, experiment, model, chat, cut_at_eos,
                                                                   humaneval, mbpp):
    from dllm.eval.runner import check_task

    for task, scoring in (("gsm8k", None), ("humaneval", humaneval), ("mbpp", mbpp)):
        if task == "mbpp" and mbpp is None:  # not in the table
            continue
        cfg = composer("config", overrides=[f"+experiment={experiment}", f"model={model}", f"task={task}",
                                            "task.allow_code_execution=true"])
        settings = check_task(cfg)
        assert (cfg.model.instruct, settings.cut_at_eos, settings.code_scoring) == (chat, cut_at_eos, scoring), task
        assert settings.cut_at_until == (model != "dream_base")  # DPad's Dream: escape_until=true
        if task == "gsm8k":  # Sparse-dLLM's OpenCompass prompt and scoring; lm-eval's elsewhere
            assert settings.lm_eval_task == ("dllm_gsm8k_opencompass" if experiment == "sparse_dllm_table1" else "gsm8k")
        assert not cfg.task.fewshot_as_multiturn


def test_d2cache_table1_runs_math_500_with_lm_eval_0_4_9_fewshot_text(composer):
    from dllm.eval.runner import check_task

    settings = check_task(composer("config", overrides=["+experiment=d2cache_table1", "task=math"]))
    assert settings.lm_eval_task == "dllm_math500_fewshot_0_4_9" and settings.code_scoring is None


def test_d2cache_table1_gives_dream_its_humaneval_prompt(composer):
    """d²Cache's eval.py (e20557d) sets Dream's humaneval_instruct prompt for Dream-Instruct only."""
    from dllm.eval.runner import check_task

    for model, scoring in (("llada", "sanitize"), ("dream", "sanitize_dream_prompt")):
        cfg = composer("config", overrides=["+experiment=d2cache_table1", f"model={model}", "task=humaneval",
                                            "task.allow_code_execution=true"])
        settings = check_task(cfg)
        assert settings.code_scoring == scoring
        assert settings.lm_eval_task == {"sanitize": "dllm_humaneval_sanitized",
                                         "sanitize_dream_prompt": "dllm_humaneval_sanitized_dream_prompt"}[scoring]


def test_dkv_table1_scores_zero_shot_math_with_math_verify(composer, caplog):
    """0-shot answers box their result in prose; Minerva's exact_match reads only the 'Final Answer'
    sentence its few-shot examples teach (a 0-shot run that keeps it is warned about)."""
    from dllm.eval.runner import check_task

    for task in ("gsm8k", "math", "humaneval", "mbpp"):
        cfg = composer("config", overrides=["+experiment=dkv_table1", f"task={task}", "task.allow_code_execution=true"])
        default = composer("config", overrides=[f"task={task}"]).task.metric
        assert check_task(cfg).metric == ("math_verify,none" if task == "math" else default)
    with caplog.at_level("WARNING", logger="dllm.eval.runner"):
        check_task(composer("config", overrides=["+experiment=dkv_table1", "task=math"]))
        assert not caplog.records
        check_task(composer("config", overrides=["task=math", "task.n_shot=0"]))
    assert "task.metric='math_verify,none'" in caplog.text


def test_n_shot_on_a_zero_shot_task_is_said_before_the_model_loads(composer, caplog):
    """HumanEval is fixed at 0 shots: task.n_shot=3 is warned about while the task is prepared, not
    after a run of hours."""
    from dllm.eval.runner import check_task, task_manager, tasks_to_run

    settings = check_task(composer("config", overrides=["task=humaneval_local", "task.n_shot=3",
                                                        "task.allow_code_execution=true"]))
    with caplog.at_level("WARNING", logger="dllm.eval.runner"):
        tasks_to_run(settings, task_manager(settings))
    assert "task.n_shot=3: lm-eval task humaneval_local_sanitized is fixed at 0 shots" in caplog.text


def test_sweep_summary_prints_the_sweeps_rows(tmp_path, capsys):
    """The multirun-end callback: only this sweep's rows, accuracy ± stderr, speedup over none."""
    from omegaconf import OmegaConf

    from dllm.logging.sinks import append_csv
    from dllm.logging.sweep_summary import SweepSummary

    csv_path, sweep = tmp_path / "runs.csv", tmp_path / "sweep"
    base = dict(run_id="x", model="tiny_llada", decoding="low_confidence", task="arith", status="ok",
                accuracy_stderr=0.05, throughput_useful_tok_s=100.0)
    append_csv(csv_path, {**base, "cache": "none", "accuracy": 0.75, "throughput_all_tok_s": 200.0, "run_dir": str(sweep / "0")})
    append_csv(csv_path, {**base, "cache": "dual", "accuracy": 0.7, "throughput_all_tok_s": 500.0, "run_dir": str(sweep / "1")})
    append_csv(csv_path, {**base, "cache": "prefix", "accuracy": 0.1, "throughput_all_tok_s": 1.0, "run_dir": str(tmp_path / "other")})
    # a none row with another decoding is not the baseline of the low-confidence rows
    append_csv(csv_path, {**base, "cache": "none", "decoding": "eb_sampler", "accuracy": 0.7, "throughput_all_tok_s": 800.0,
                          "run_dir": str(sweep / "2")})
    config = OmegaConf.create({"results_csv": str(csv_path), "hydra": {"sweep": {"dir": str(sweep)}}})
    SweepSummary().on_multirun_end(config)
    out = capsys.readouterr().out
    assert f"sweep done: 3 row(s) written to {csv_path}" in out
    lines = [line for line in out.splitlines() if line.startswith("tiny_llada")]
    assert len(lines) == 3 and "prefix" not in out
    assert "eb_sampler" in lines[2] and "1.00x" in lines[2]  # its own decoding's none row: itself
    assert "75.0 ± 5.0" in lines[0] and "1.00x" in lines[0]
    assert "70.0 ± 5.0" in lines[1] and "2.50x" in lines[1] and lines[1].endswith("ok")


def test_sweep_summary_compares_each_row_with_the_none_of_its_workload():
    """tiny_sweep runs none and dkv_decode at two response lengths: each against its own length's none."""
    from dllm.logging.sweep_summary import summary_table

    base = dict(model="tiny_llada", decoding="low_confidence", task="arith", status="ok", accuracy=0.5)
    rows = [{**base, "cache": cache, "gen_length": gen, "throughput_all_tok_s": speed}
            for cache, gen, speed in (("none", "16", 100.0), ("none", "32", 50.0), ("dkv_decode", "16", 200.0),
                                      ("dkv_decode", "32", 150.0))]
    lines = summary_table(rows).splitlines()[2:]
    assert ["1.00x", "1.00x", "2.00x", "3.00x"] == [line.split()[-2] for line in lines]
    # Steps, dtype and thread count are part of what a none row stands for.
    rows = [{**base, "cache": cache, "gen_length": "16", "decoding.steps": steps, "dtype": dtype, "threads": threads,
             "throughput_all_tok_s": speed}
            for cache, steps, dtype, threads, speed in (
                ("none", "16", "float32", "1", 100.0), ("none", "4", "float32", "1", 400.0),
                ("dkv_decode", "16", "float32", "1", 200.0), ("none", "16", "bfloat16", "1", 50.0),
                ("dkv_decode", "16", "float32", "2", 300.0))]
    lines = summary_table(rows).splitlines()[2:]
    assert ["1.00x", "1.00x", "2.00x", "1.00x", "—"] == [line.split()[-2] for line in lines]


def test_sweep_summary_names_an_unreadable_csv(tmp_path, capsys):
    from dllm.logging.sweep_summary import sweep_rows

    csv_path = tmp_path / "runs.csv"
    csv_path.write_text('run_dir,cache\nx,"unclosed\n')
    assert sweep_rows(csv_path, tmp_path) == []
    assert "repair_csv.py" in capsys.readouterr().out


def test_slurm_cpu_preset_requests_no_gpu(composer):
    """A CPU-only cluster rejects any GPU request (sbatch: Invalid generic resource)."""
    launcher = composer("config", overrides=["hydra/launcher=slurm_cpu"], return_hydra_config=True).hydra.launcher
    assert launcher.gpus_per_node is None and "SlurmLauncher" in launcher._target_
    assert launcher.timeout_min == 360 and launcher.submitit_folder.endswith("/.submitit/%j")  # the rest of slurm


def test_dkv_table2_pins_the_reference_dream_rules(composer):
    """The published Dream-Base numbers came from the dKV-Cache code: its hidden top_k=50 and its
    default shift rule (un) for the decode and pd variants."""
    cfg = composer("config", overrides=["+experiment=dkv_table2"])
    assert cfg.decoding.name == "dream" and cfg.decoding.top_k == 50 and cfg.decoding.alg == "entropy"
    methods = cfg.methods
    assert methods.dkv_decode.cache.shift_rule == "un" and methods.dkv_pd.cache.shift_rule == "un"
