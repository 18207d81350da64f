"""Model presets of the LLaDA / Dream descendants, LLaDA-MoE and the block-diffusion models: each
composes, carries its authors' published generation settings in a form this harness runs, is refused
offline before anything loads (naming the Hub id and the way out), and loads a local checkpoint folder
of its on-disk format."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dllm.decoding.base import build_decoder
from dllm.models.tiny import BASE_ARGS, make_tiny_checkpoint

from conftest import compose

ROOT = Path(__file__).resolve().parents[1]
# preset -> (family, Hub id, instruct)
PRESETS = {
    "dream_coder": ("dream", "Dream-org/Dream-Coder-v0-Instruct-7B", True),
    "dream_coder_base": ("dream", "Dream-org/Dream-Coder-v0-Base-7B", False),
    "diffucoder": ("dream", "apple/DiffuCoder-7B-Instruct", True),
    "diffucoder_base": ("dream", "apple/DiffuCoder-7B-Base", False),
    "diffucoder_cpgrpo": ("dream", "apple/DiffuCoder-7B-cpGRPO", True),
    "dparallel_dream": ("dream", "Zigeng/dParallel_Dream_7B_Instruct", True),
    "d3llm_dream": ("dream", "d3LLM/d3LLM_Dream", True),
    "dparallel_llada": ("llada", "Zigeng/dParallel-LLaDA-8B-instruct", True),
    "d3llm_llada": ("llada", "d3LLM/d3LLM_LLaDA", True),
    "mmada_mixcot": ("llada", "Gen-Verse/MMaDA-8B-MixCoT", True),
    "llada_moe": ("llada_moe", "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", True),
    "llada_moe_base": ("llada_moe", "inclusionAI/LLaDA-MoE-7B-A1B-Base", False),
    "sdar_1_7b": ("sdar", "JetLM/SDAR-1.7B-Chat", True),
    "sdar_4b": ("sdar", "JetLM/SDAR-4B-Chat", True),
    "sdar_8b": ("sdar", "JetLM/SDAR-8B-Chat", True),
    "trado_4b": ("sdar", "Gen-Verse/TraDo-4B-Instruct", True),
    "trado_8b": ("sdar", "Gen-Verse/TraDo-8B-Instruct", True),
    "fast_dllm_v2_7b": ("fast_dllm_v2", "Efficient-Large-Model/Fast_dLLM_v2_7B", True),
    "fast_dllm_v2_1_5b": ("fast_dllm_v2", "Efficient-Large-Model/Fast_dLLM_v2_1.5B", True),
    "llada2_mini": ("llada2", "inclusionAI/LLaDA2.0-mini", True),
    "llada2_flash": ("llada2", "inclusionAI/LLaDA2.0-flash", True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint per on-disk format: LLaDA, Dream, LLaDA-MoE, SDAR, Fast-dLLM v2, LLaDA2.0, and MMaDA's
    (LLaDA's weights under model_type "mmada" with its extra vocabulary fields)."""
    root = tmp_path_factory.mktemp("formats")
    formats = ("llada", "dream", "llada_moe", "sdar", "fast_dllm_v2", "llada2")
    out = {f: make_tiny_checkpoint(f, root / f) for f in formats}
    mmada = Path(shutil.copytree(out["llada"], root / "mmada"))
    cfg = json.loads((mmada / "config.json").read_text())
    cfg.update(model_type="mmada", architectures=["MMadaModelLM"], llm_vocab_size=cfg["vocab_size"], codebook_size=8192,
               num_vq_tokens=256, num_new_special_tokens=0)
    (mmada / "config.json").write_text(json.dumps(cfg))
    out["mmada"] = mmada
    return out


def folder_for(preset: str, folders: dict[str, Path]) -> Path:
    return folders["mmada" if preset == "mmada_mixcot" else PRESETS[preset][0]]


def test_every_model_preset_is_listed_here():
    """A new preset file gets a row above (its family, Hub id and instruct flag are checked)."""
    new = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    old = {"llada", "llada_base", "llada_1_5", "dream", "dream_base"}
    assert {n for n in new if not n.startswith("tiny_")} == set(PRESETS) | old


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_with_its_published_settings(preset):
    family, repo, instruct = PRESETS[preset]
    cfg = compose(f"model={preset}")
    assert (cfg.model.name, cfg.model.family, cfg.model.path, cfg.model.instruct) == (preset, family, repo, instruct)
    assert not cfg.model.tiny and not cfg.model.trust_remote_code
    published = OmegaConf.to_container(cfg.model.published)
    assert published["source"].startswith("https://")
    params = dict(published["decoding"])
    decoder = build_decoder(params.pop("name"), **params)  # settings this harness can run as they are
    decoder.check(published["gen_length"])
    header = (ROOT / "conf" / "model" / f"{preset}.yaml").read_text()
    assert f"python run.py model={preset} gen_length={published['gen_length']}" in header


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the settings were checked")

    for key, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DLLM_CACHE": str(tmp_path / "dllm")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return refuse


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_is_refused_offline_before_loading(preset, offline, monkeypatch, tmp_path):
    import dllm.pipeline

    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", offline)
    cfg = compose(f"model={preset}", f"results_csv={tmp_path / 'runs.csv'}")
    repo = PRESETS[preset][1]
    with pytest.raises(ValueError, match=rf"huggingface-cli download {repo}\).*model\.path=/local/folder"):
        dllm.pipeline.run(cfg)
    assert not (tmp_path / "runs.csv").exists()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_loads_a_local_folder_of_its_format(preset, folders):
    from dllm.pipeline import check_checkpoint, load_model_and_tokenizer, plan_run

    # A block-diffusion model needs a block-diffusion decoder (the default one is refused): its published one.
    decoding = ["+experiment=published"] if BASE_ARGS[PRESETS[preset][0]].get("block_causal") else []
    cfg = compose(f"model={preset}", *decoding, f"model.path={folder_for(preset, folders)}", "gen_length=32",
                  "threads=1")
    plan = plan_run(cfg)
    check_checkpoint(cfg, plan)
    net, tokenizer = load_model_and_tokenizer(cfg, plan)
    assert net.args.family == PRESETS[preset][0]
    assert tokenizer.mask_token_id == net.args.mask_token_id


def test_a_preset_refuses_a_folder_of_another_family(folders, offline, monkeypatch):
    import dllm.pipeline

    monkeypatch.setattr(dllm.pipeline, "load_model_and_tokenizer", offline)
    cfg = compose("model=llada_moe", f"model.path={folders['llada']}")
    with pytest.raises(ValueError, match=r"is a 'llada' checkpoint .* family='llada_moe'"):
        dllm.pipeline.run(cfg)


@pytest.mark.parametrize("overrides", [
    ["model=tiny_llada_moe_random"],
    ["model=llada_moe", "model.path={llada_moe}"],
], ids=["tiny_random", "local_folder"])
def test_moe_generates_end_to_end_offline(overrides, folders, offline):
    """task=generate through the pipeline (chat template, cached decoding, cut at the stop tokens)."""
    from dllm.pipeline import run

    overrides = [o.format(**folders) for o in overrides]
    cfg = compose(*overrides, "task=generate", "prompt='What is 7 * 6?'", "gen_length=32", "threads=1",
                  "cache=dkv_decode")
    (record,) = run(cfg)
    assert 0 < record["recompute_ratio"] < 1 and 1 <= record["useful_tokens"] <= 32
    assert record["nfe"] == 32


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_experiment_published_applies_the_preset_settings(preset):
    from dllm.pipeline import plan_run

    cfg = compose(f"model={preset}", "+experiment=published")
    published = OmegaConf.to_container(cfg.model.published, resolve=True)
    plan = plan_run(cfg)
    assert plan.decoder.name == published["decoding"]["name"]
    assert plan.gen_length == published["gen_length"] and cfg.experiment == "published"
    for key, value in published["decoding"].items():
        if key != "name":
            assert getattr(plan.decoder, key, value) == value
