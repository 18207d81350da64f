"""The embedded default: tiny LLaDA / Dream (and block-diffusion SDAR) checkpoints trained on CPU (assets/, scripts/train_tiny.py)
on the synthetic word problems of dllm/eval/arith_data.py.

- the committed checkpoints load and clear their accuracy floors on a fixed held-out subset;
- the data generator is deterministic and its train / test splits are disjoint;
- training is reproducible (same seed -> same losses) and training.json reports the full run;
- the training prompt is exactly the context lm-eval sends for ``task=arith``.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose, offline_env, subprocess_env, tiny_args, tiny_net
from dllm.eval import arith_data

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
FLOORS = {"llada": 0.6, "dream": 0.5, "sdar": 0.9}  # accuracy floors on the fixed subset (greedy, cache=none)
SUBSET = 50  # the first 50 problems of the committed held-out file


def load_train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_tiny():
    return load_train_tiny()


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # run.py's outputs/ go here; model.path still finds assets/
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_committed_checkpoint_reaches_its_accuracy_floor(family, offline):
    """The whole default path (config -> model -> lm-eval task=arith -> record) on 50 problems."""
    from dllm.eval import runner

    folder = ASSETS / f"tiny_{family}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json", "loss.png"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    overrides = [f"model=tiny_{family}", "cache=none", f"task.limit={SUBSET}", "batch_size=25", "device=cpu",
                 f"results_csv={offline / 'runs.csv'}"]
    if family == "sdar":  # block diffusion: its own decoder (the preset's published one)
        overrides.append("+experiment=published")
    cfg = compose(*overrides)
    assert cfg.task.name == "arith"  # the embedded default task
    row = runner.run_eval(cfg)
    assert row["status"] == "ok" and row["n_samples"] == SUBSET
    assert row["accuracy"] >= FLOORS[family], row


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_training_json_reports_the_full_run(family):
    info = json.loads((ASSETS / f"tiny_{family}" / "training.json").read_text())
    assert info["family"] == family and info["command"].startswith("python scripts/train_tiny.py")
    assert info["final_loss"] >= 0 and info["steps"] > 0 and info["data"]["train_problems"] > 0
    assert info["heldout"]["n"] == 200
    assert info["heldout"]["flexible_extract"] >= FLOORS[family]
    config = json.loads((ASSETS / f"tiny_{family}" / "config.json").read_text())
    assert config["model_type"] == {"llada": "llada", "dream": "Dream", "sdar": "sdar"}[family]


def test_checkpoints_are_small():
    for family in ("llada", "dream", "sdar"):
        size = (ASSETS / f"tiny_{family}" / "model.safetensors").stat().st_size
        assert size < 8 * 2**20, f"tiny_{family} weighs {size / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- data
def test_generator_is_deterministic():
    a = arith_data.make_split("train", 300, seed=7)
    b = arith_data.make_split("train", 300, seed=7)
    assert a == b
    assert a != arith_data.make_split("train", 300, seed=8)
    for p in a[:50]:
        assert p.answer.endswith(f"#### {p.value}")
        assert arith_data.extract_strict(p.answer) == str(p.value)


def test_committed_test_file_is_the_generators_output():
    expected = [p.doc() for p in arith_data.make_split("test", 500, arith_data.TEST_SEED)]
    assert arith_data.load_test() == expected


def test_train_and_test_splits_are_disjoint():
    test_questions = {d["question"] for d in arith_data.load_test()}
    assert all(arith_data.split_of(q) == "test" for q in test_questions)
    train = arith_data.make_split("train", 20000, seed=0)  # the problems the checkpoints train on
    assert all(arith_data.split_of(p.question) == "train" for p in train)
    assert not test_questions & {p.question for p in train}


def test_scoring_matches_gsm8k_extraction():
    answer = "He buys 4 more: 3 + 4 = 7.\n#### 7"
    assert arith_data.is_correct("3 + 4 = 7.\n#### 7", answer, strict=True)
    assert arith_data.is_correct("3 + 4 = 7.\nso 7", answer)  # flexible: the last number
    assert not arith_data.is_correct("3 + 4 = 7.\nso 7", answer, strict=True)
    assert not arith_data.is_correct("#### 8", answer)


# ----------------------------------------------------------------------------- training
def test_training_is_reproducible(tmp_path, train_tiny):
    def run(seed: int, out: str) -> list[float]:
        cfg = train_tiny.TrainConfig(
            family="dream", out=str(tmp_path / out), seed=seed, steps=20, batch_size=8, warmup=5,
            train_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, eval_n=0,
        )
        return train_tiny.train(cfg, progress=False)["losses"]

    first, second = run(0, "a"), run(0, "b")
    assert [round(x, 3) for x in first] == [round(x, 3) for x in second]
    assert first[-1] < first[0]
    assert [round(x, 3) for x in run(1, "c")] != [round(x, 3) for x in first]
    # The written folder is a loadable checkpoint in the real format.
    from dllm.models.loading import load_model

    net = load_model(str(tmp_path / "a"), expected_family="dream")
    assert net.args.logit_shift == 1


@pytest.mark.parametrize("bad, message", [
    (["--steps", "0"], "--steps=0 must be > 0"), (["--threads", "0"], "--threads=0 must be > 0"),
    (["--dim", "130"], "dim must be a multiple of n_heads"), (["--min-lr-ratio", "2"], "must be in [0, 1]"),
    (["--eps", "0"], "--eps=0.0 must be in (0, 1)"), (["--head-init-from-embedding", "ture"], "invalid choice: 'ture'"),
    (["--out", __file__], "is a file, not a folder"),
])
def test_bad_training_settings_are_refused_before_training(train_tiny, capsys, bad, message):
    argv = ["--family", "llada", "--out", "/nonexistent/tiny", *bad]
    with pytest.raises(SystemExit) as exit_:
        train_tiny.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert train_tiny.parse_args(["--family", "llada", "--out", "x", "--head-init-from-embedding", "True"]).head_init_from_embedding


def test_a_setting_found_impossible_after_the_tokenizer_leaves_the_out_folder_as_it_was(tmp_path, train_tiny, capsys):
    """An answer longer than --gen-length shows only once the tokenizer is learnt; the checkpoint
    already in --out keeps its files (a new tokenizer beside the old weights would load and run)."""
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(ROOT / "assets" / "tiny_llada", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_:
        train_tiny.main(["--family", "llada", "--out", str(out), "--gen-length", "4", "--steps", "1", "--eval-n", "0"])
    assert exit_.value.code == 2 and "an answer has" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging folder left


def test_block_diffusion_training_learns_and_writes_a_block_causal_checkpoint(tmp_path, train_tiny):
    cfg = train_tiny.TrainConfig(
        family="sdar", out=str(tmp_path / "sdar"), steps=20, batch_size=8, warmup=5, train_size=400, dim=32,
        n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, eval_n=0, block_length=4,
    )
    losses = train_tiny.train(cfg, progress=False)["losses"]
    assert losses[-1] < losses[0]
    from dllm.models.loading import load_model

    net = load_model(str(tmp_path / "sdar"), expected_family="sdar")
    assert net.args.block_causal and net.args.qk_norm


def test_block_diffusion_training_cannot_see_the_block_it_predicts(train_tiny):
    """The noisy copy's predictions depend on the clean copy's earlier blocks only: changing a clean
    token of the same or a later block leaves them unchanged, changing an earlier one does not."""
    net = tiny_net(tiny_args("llada", block_causal=True))
    x0 = torch.randint(0, 60, (1, 12))
    xt = x0.clone()
    xt[0, 4:8] = net.args.mask_token_id  # block 1 noisy
    real = torch.ones_like(x0, dtype=torch.bool)
    positions = torch.arange(12)[None]
    base = train_tiny.block_diffusion_hidden(net, xt, x0, real, positions, 4)[0, 4:8]
    for column, same in ((5, True), (9, True), (2, False)):
        changed = x0.clone()
        changed[0, column] = (changed[0, column] + 1) % 60
        hidden = train_tiny.block_diffusion_hidden(net, xt, changed, real, positions, 4)[0, 4:8]
        assert torch.allclose(hidden, base) == same, column


def test_training_prompt_is_lm_evals_context(train_tiny):
    """What the model was trained on == what ``task=arith`` sends it (chat template included)."""
    from lm_eval.tasks import TaskManager

    from dllm.eval.lm import DllmLM
    from dllm.eval.runner import resolve_include_path
    from dllm.models.tokenization import load_tokenizer

    manager = TaskManager(include_path=resolve_include_path("arith"), include_defaults=False)
    task = manager.load(["arith"])["tasks"]["arith"]
    docs = list(task.test_docs())
    assert [dict(d) for d in docs] == arith_data.load_test()
    for family in ("llada", "dream"):
        tokenizer = load_tokenizer(ASSETS / f"tiny_{family}")
        lm = DllmLM.__new__(DllmLM)  # only the chat-template hook is used
        lm.tokenizer = tokenizer
        for doc in docs[:3]:
            context = task.fewshot_context(doc, num_fewshot=0, apply_chat_template=True, chat_template=lm.apply_chat_template)
            assert tokenizer(context, add_special_tokens=False)["input_ids"] == train_tiny.chat_prompts(tokenizer, [doc["question"]])[0]


# ----------------------------------------------------------------------------- the default run
def test_default_run_is_tiny_llada_on_arith(tmp_path):
    """``python run.py`` (the Quick start's main job) on a few problems: it prints accuracy and
    throughput and writes the record."""
    env = subprocess_env(tmp_path)
    results_csv = tmp_path / "runs.csv"
    command = [sys.executable, "run.py", "task.limit=6", f"results_csv={results_csv}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[arith] tiny_llada cache=none" in done.stdout and "useful tok/s" in done.stdout
    with open(results_csv, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["model"], row["cache"], row["task"], row["status"], row["device"]) == ("tiny_llada", "none", "arith", "ok", "cpu")
    assert row["n_samples"] == "6" and float(row["throughput_useful_tok_s"]) > 0


def test_generate_task_decodes_the_example_prompts(tmp_path):
    env = subprocess_env(tmp_path)
    command = [sys.executable, "run.py", "task=generate", "model=tiny_dream", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("####" in r["generation"] for r in records), records


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_random_twins_are_built_on_first_use(family, offline):
    """``model=tiny_<family>_random``: no path, so the random-weight checkpoint is built into $DLLM_CACHE."""
    from dllm.pipeline import load_model_and_tokenizer, plan_run

    cfg = compose(f"model=tiny_{family}_random", "device=cpu")
    net, tokenizer = load_model_and_tokenizer(cfg, plan_run(cfg))
    assert net.args.family == family and net.args.dim == 64  # tiny.DEFAULT_SHAPE, not the trained 128
    assert list((offline / "dllm").iterdir()), "nothing was built under $DLLM_CACHE"
    assert tokenizer.chat_template


@pytest.mark.parametrize("dtype,packed", [("float32", True), ("bfloat16", False)])
def test_pipeline_prepacks_float32_weights_on_cpu(dtype, packed):
    """The run's model: linear weights prepacked for oneDNN in float32 on CPU, dense otherwise."""
    from dllm.models.packed import PackedLinear, can_pack
    from dllm.pipeline import load_model_and_tokenizer, plan_run

    if packed and not can_pack(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN weight packing in this torch build")
    cfg = compose("model=tiny_llada", "device=cpu", f"dtype={dtype}")
    net, _ = load_model_and_tokenizer(cfg, plan_run(cfg))
    assert any(isinstance(m, PackedLinear) for m in net.modules()) is packed
    assert any(isinstance(m, torch.nn.Linear) for m in net.modules()) is not packed
