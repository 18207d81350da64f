"""What a run shows on the console: a run header with the thread count, the warm-up as its own
phase, no irrelevant lm-eval warnings, only rank 0 talking under torchrun, and run folders
without a trailing dash."""
from __future__ import annotations

import logging

import pytest

from test_eval import run_scripted


def test_run_header_warm_up_phase_and_quiet_lm_eval(monkeypatch, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    run_scripted(monkeypatch, tmp_path, lambda prompt: "#### 3", "task=gsm8k_local", "task.limit=2", "task.gen_length=64", "threads=1")
    captured = capsys.readouterr()
    assert "[run] model=tiny_llada_random" in captured.out and "threads=1" in captured.out
    assert "warm-up (batch of 1, not timed)" in captured.err  # the first batch, generated untimed
    assert "Custom kwargs can be passed" not in caplog.text and "num_fewshot has been set to 0" not in caplog.text
    assert "Running generate_until requests" in caplog.text  # lm-eval's other messages stay


def test_only_rank_zero_logs_below_warning():
    from dllm.eval.runner import quiet_console

    before = {name: logging.getLogger(name).level for name in ("", "lm_eval", "dllm")}
    try:
        quiet_console(is_main=True)
        assert logging.getLogger("lm_eval").level == before["lm_eval"]
        quiet_console(is_main=False)
        assert all(logging.getLogger(name).level == logging.WARNING for name in before)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_threads_auto_follows_the_job(monkeypatch):
    import torch

    from dllm.pipeline import resolve_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    default = resolve_threads("auto")
    before = torch.get_num_threads()
    try:  # a previous job of the same sweep set its own count: auto is torch's default all the same
        torch.set_num_threads(1 if default > 1 else 2)
        assert resolve_threads("auto") == default
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert resolve_threads("auto") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads("auto") == 2 and resolve_threads(5) == 5 and resolve_threads(8) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # the environment is held to the cores as threads=N is
    with pytest.raises(ValueError, match=r"threads=auto takes \$OMP_NUM_THREADS=64, more than this machine's 8 cores"):
        resolve_threads("auto")
    for text in ("abc", "0", "-3", "4,2"):  # libgomp warns and ignores it; the run says so and stops
        monkeypatch.setenv("OMP_NUM_THREADS", text)
        with pytest.raises(ValueError, match=rf"threads=auto takes \$OMP_NUM_THREADS='{text}', which is no number"):
            resolve_threads("auto")
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: as if unset
    assert resolve_threads("auto") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    for bad in (0, "many", 1.5, True, 9, 100000):  # more threads than cores: oversubscribed (or no memory to start)
        with pytest.raises(ValueError, match=r"threads=.* must be auto or an integer from 1 to 8 \(this machine's cores\)"):
            resolve_threads(bad)


def test_run_folder_without_overrides_has_no_trailing_dash():
    import runpy

    from omegaconf import OmegaConf

    runpy.run_path(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "run.py"))  # registers the resolver
    cfg = OmegaConf.create({"o": "", "d": "12-00-00${dllm.dash:${o}}", "o2": "cache=dual", "d2": "12-00-00${dllm.dash:${o2}}"})
    assert cfg.d == "12-00-00" and cfg.d2 == "12-00-00-cache=dual"
