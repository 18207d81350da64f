"""``run.py task=<eval task>``: validate -> load -> lm-eval -> one run record -> sinks.

Order matters: every setting is checked (task, model/cache/decoding plan, the lm-eval task name)
before the model loads, and the CSV row is appended last, after the run directory and W&B, so a
run that crashes anywhere writes no row (a sweep's resume will redo it).
"""
from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from dllm.pipeline import RunPlan

log = logging.getLogger(__name__)

TASKS_ROOT = Path(__file__).resolve().parent / "tasks"
CODE_EVAL_ENV = "HF_ALLOW_CODE_EVAL"


@dataclass
class TaskSettings:
    name: str
    lm_eval_task: str
    n_shot: int | None
    limit: int | float | None
    metric: str  # lm-eval result key, "<metric>,<filter>"
    include_path: list[str]
    include_defaults: bool
    allow_code_execution: bool
    mc_num: int
    fewshot_as_multiturn: bool
    code_scoring: str | None = None  # code tasks: the convention that turns answers into programs
    num_return_sequences: int = 1  # samples per problem (pass@k); 1 = lm-eval's task as configured
    pass_k: tuple[int, ...] = (1,)  # the k of pass@k when num_return_sequences > 1
    # the response text ends at the first end-of-text / end-of-turn token; False: LLaDA's eval_llada.py
    # convention, where special tokens are dropped and the text after them kept (dllm.eval.lm)
    cut_at_eos: bool = True
    # the response text is cut at the request's stop strings (lm-eval's `until`); False: Dream's
    # escape_until=true (DPad's Dream evaluation), where only the EOS ends it
    cut_at_until: bool = True


def _get(node: DictConfig, key: str, default=None):
    return OmegaConf.select(node, key, default=default)


def resolve_include_path(value) -> list[str]:
    """null -> []; a name under dllm/eval/tasks/ (e.g. ``local``) or any existing folder."""
    if value in (None, ""):
        return []
    paths = [value] if isinstance(value, str) else list(value)
    out = []
    for p in paths:
        candidates = [TASKS_ROOT / str(p), Path(str(p)).expanduser()]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            bundled = sorted(d.name for d in TASKS_ROOT.iterdir() if d.is_dir() and not d.name.startswith("_"))
            raise ValueError(
                f"task.include_path={p!r} is neither a folder under {TASKS_ROOT} (bundled: {bundled}) nor an existing folder"
            )
        out.append(str(found.resolve()))
    return out


def code_scoring_task(cfg: DictConfig) -> tuple[str | None, str | None]:
    """(code_scoring, lm-eval task) of a code task: ``auto`` is ``sanitize`` for instruct models
    (the papers' convention) and ``raw`` for base models; (None, None) for other tasks."""
    t = cfg.task
    scoring = _get(t, "code_scoring")
    tasks = OmegaConf.to_container(t.lm_eval_tasks) if _get(t, "lm_eval_tasks") is not None else {}
    if scoring is None and not (tasks and not _get(t, "lm_eval_task")):
        return None, None
    if not tasks:
        raise ValueError(f"task.code_scoring={scoring!r}: task={t.name} is no code task (code scoring applies to "
                         "humaneval, mbpp and their local twins)")
    if scoring == "auto":
        scoring = "sanitize" if bool(cfg.model.instruct) else "raw"
    if scoring not in tasks:
        raise ValueError(f"task.code_scoring={scoring!r} (allowed: auto, {', '.join(tasks)})")
    return scoring, str(tasks[scoring])


def check_task(cfg: DictConfig) -> TaskSettings:
    """Everything about the task that can be checked without lm-eval or the model."""
    from dllm.pipeline import boolean_setting

    t = cfg.task
    name = str(t.name)
    code_scoring, lm_eval_task = code_scoring_task(cfg)
    if _get(t, "lm_eval_task"):  # an explicit lm-eval task wins; its scoring is its own
        code_scoring, lm_eval_task = None, _get(t, "lm_eval_task")
    if not lm_eval_task:
        raise ValueError(f"task={name}: task.lm_eval_task is empty (the lm-eval task or group to run)")
    n_shot = _get(t, "n_shot")
    if n_shot is not None and (isinstance(n_shot, bool) or not isinstance(n_shot, int) or n_shot < 0):
        raise ValueError(f"task.n_shot={n_shot!r} must be an integer >= 0 (or null for the lm-eval task's default)")
    limit = _get(t, "limit")
    if limit is not None:
        ok = not isinstance(limit, bool) and (
            (isinstance(limit, int) and limit >= 1) or (isinstance(limit, float) and 0 < limit < 1)
        )
        if not ok:
            raise ValueError(
                f"task.limit={limit!r} must be null (all samples), an integer >= 1 (first N samples) "
                "or a fraction in (0, 1)"
            )
    metric = _get(t, "metric")
    if not metric or "," not in str(metric):
        raise ValueError(f"task.metric={metric!r} must be an lm-eval result key '<metric>,<filter>', e.g. 'acc,none'")
    if n_shot == 0 and "math" in str(lm_eval_task) and str(metric).startswith("exact_match"):
        log.warning("task=%s with task.n_shot=0: exact_match reads only Minerva's 'Final Answer: The final answer "
                    "is X' sentence, which only the few-shot examples teach, so 0-shot answers score near 0; "
                    "task.metric='math_verify,none' scores them (dkv_table1 does)", name)
    allow = boolean_setting(cfg, "task.allow_code_execution", default=False)
    if _get(t, "executes_code", False) and not allow:
        raise ValueError(
            f"task={name} executes model-written code to score it; opt in explicitly with "
            "task.allow_code_execution=true (it sets HF_ALLOW_CODE_EVAL=1 and confirms lm-eval's unsafe-code run)"
        )
    mc_num = _get(t, "mc_num", 1)
    if isinstance(mc_num, bool) or not isinstance(mc_num, int) or mc_num < 1:
        raise ValueError(f"task.mc_num={mc_num!r} must be an integer >= 1 (Monte Carlo draws per likelihood)")
    samples = _get(t, "num_return_sequences", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"task.num_return_sequences={samples!r} must be an integer >= 1")
    pass_k = _get(t, "pass_k", [1])
    pass_k = list(pass_k) if isinstance(pass_k, (list, tuple)) or OmegaConf.is_list(pass_k) else [pass_k]
    if not pass_k or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= samples for k in pass_k):
        raise ValueError(f"task.pass_k={pass_k} must list integers in [1, task.num_return_sequences={samples}]")
    defaults = boolean_setting(cfg, "task.include_defaults", default=True)
    return TaskSettings(
        name=name,
        lm_eval_task=str(lm_eval_task),
        n_shot=n_shot,
        limit=limit,
        metric=str(metric),
        include_path=resolve_include_path(_get(t, "include_path")),
        include_defaults=defaults,
        allow_code_execution=allow,
        mc_num=mc_num,
        fewshot_as_multiturn=boolean_setting(cfg, "task.fewshot_as_multiturn", default=False),
        code_scoring=code_scoring,
        num_return_sequences=samples,
        pass_k=tuple(pass_k),
        cut_at_eos=boolean_setting(cfg, "task.cut_at_eos", default=True),
        cut_at_until=boolean_setting(cfg, "task.cut_at_until", default=True),
    )


def check_logger(cfg: DictConfig) -> dict | None:
    from dllm.logging.sinks import WANDB_MODES

    node = _get(cfg, "logger.wandb")
    if node is None:
        return None
    settings = OmegaConf.to_container(node, resolve=True)
    mode = settings.get("mode")
    if mode is not None and mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} (allowed: null (= $WANDB_MODE or offline), {', '.join(WANDB_MODES)})")
    if mode is None and os.environ.get("WANDB_MODE") and os.environ["WANDB_MODE"] not in WANDB_MODES:
        raise ValueError(f"$WANDB_MODE={os.environ['WANDB_MODE']!r}, which logger.wandb.mode=null uses (allowed: "
                         f"{', '.join(WANDB_MODES)}; or set logger.wandb.mode)")
    if not settings.get("project") or not isinstance(settings["project"], str):
        raise ValueError(f"logger.wandb.project={settings.get('project')!r} must be a non-empty text")
    for key in ("entity", "group"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ValueError(f"logger.wandb.{key}={settings[key]!r} must be a text or null")
    tags = settings.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags)):
        raise ValueError(f"logger.wandb.tags={tags!r} must be a list of texts (e.g. logger.wandb.tags='[ablation,v2]')")
    return settings


def task_manager(settings: TaskSettings, manager=None):
    """lm-eval's TaskManager for the task's folders (``manager``: one made before for the same folders),
    after checking that it knows ``task.lm_eval_task``."""
    from lm_eval.tasks import TaskManager

    if manager is None:
        manager = TaskManager(include_path=settings.include_path or None, include_defaults=settings.include_defaults)
    known = manager.all_tasks
    if settings.lm_eval_task not in known:
        close = difflib.get_close_matches(settings.lm_eval_task, known, n=5)
        where = ", ".join(settings.include_path) or "none"
        raise ValueError(
            f"task.lm_eval_task={settings.lm_eval_task!r} is not an lm-eval task or group "
            f"(include_path: {where}; lm-eval built-ins: {'yes' if settings.include_defaults else 'no'}); "
            f"close names: {close or 'none'}"
        )
    return manager


# lm-eval messages that say nothing about our runs: our tasks take no --metadata, and HumanEval's
# fixed 0 shots are reported by the run itself (task.n_shot vs what ran).
QUIET_LM_EVAL = ("Custom kwargs can be passed to `--metadata`", "num_fewshot has been set to 0")


class _DropIrrelevant(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in QUIET_LM_EVAL)


def quiet_console(is_main: bool) -> None:
    """Drop lm-eval's irrelevant warnings; under torchrun only rank 0 logs below WARNING."""
    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropIrrelevant) for f in logger.filters):
            logger.addFilter(_DropIrrelevant())
    if not is_main:
        for name in ("", "lm_eval", "dllm"):
            logging.getLogger(name).setLevel(logging.WARNING)


def tasks_to_run(settings: TaskSettings, manager) -> list:
    """What ``simple_evaluate`` runs, its data loaded here, before the model loads, so that a dataset
    that cannot be fetched (offline and not cached) stops the run before minutes of loading: the
    lm-eval task's object; with several samples per problem, with ``repeats`` and its pass@k metric's
    k set (lm-eval's own humaneval_64 pattern). A group (MMLU) runs by name, since simple_evaluate
    takes prepared objects for tasks only: its data then loads a second time, from the cache."""
    from lm_eval.api.task import Task

    try:
        loaded = manager.load([settings.lm_eval_task])
    except OSError as err:  # datasets' ConnectionError / FileNotFoundError: offline and not cached, a bad path
        raise ValueError(f"task.lm_eval_task={settings.lm_eval_task!r}: its data cannot be loaded ({err}). Offline, it "
                         "must be in the Hugging Face cache (HF_HOME); the *_local tasks ship their data") from err
    no_pass_at_k = ValueError(f"task.num_return_sequences={settings.num_return_sequences}: lm-eval task "
                              f"{settings.lm_eval_task!r} has no pass@k metric (one with a k argument, like HumanEval's); use 1")
    if loaded["groups"]:
        if settings.num_return_sequences > 1:
            raise no_pass_at_k
        # The group reports what its subtasks have in common (MMLU: acc,none), each subtask its shots.
        subtasks = [task for task in loaded["tasks"].values() if hasattr(task, "_metric_fn_kwargs")]
        shared = set.intersection(*(set(result_keys(task)) for task in subtasks)) if subtasks else set()
        if subtasks and settings.metric not in shared:
            raise ValueError(f"task.metric={settings.metric!r} is not among lm-eval group {settings.lm_eval_task!r}'s "
                             f"results {sorted(shared)}")
        for task in subtasks:
            check_shots(task, settings.n_shot)
        return [settings.lm_eval_task]
    tasks = list(loaded["tasks"].values())
    for task in tasks:
        if settings.num_return_sequences > 1:
            # _metric_fn_kwargs holds each metric's YAML arguments (lm-eval has no public setter).
            with_k = [name for name, kwargs in getattr(task, "_metric_fn_kwargs", {}).items() if "k" in kwargs]
            if not isinstance(task, Task) or not with_k:
                raise no_pass_at_k
            task.set_config("repeats", settings.num_return_sequences)
            for name in with_k:
                task._metric_fn_kwargs[name]["k"] = list(settings.pass_k)
        check_metric(task, settings.metric)
        check_shots(task, settings.n_shot)
    return tasks


def check_shots(task, n_shot: int | None) -> None:
    """``task.n_shot`` no larger than the task's few-shot examples (lm-eval would fail while it
    builds the prompts, after the model loaded, with "Sample larger than population"). A task fixed
    at 0 shots ignores the setting: said here, before the model loads, not after the run."""
    if not n_shot:
        return
    if task.get_config("num_fewshot") == 0:
        log.warning("task.n_shot=%s: lm-eval task %s is fixed at 0 shots and runs 0-shot (the record says 0)",
                    n_shot, task.config.task)
        return
    docs = task.fewshot_docs()
    if docs is not None and n_shot > len(docs):
        raise ValueError(f"task.n_shot={n_shot}: lm-eval task {task.config.task!r} has {len(docs)} few-shot examples "
                         f"(allowed: 0 ... {len(docs)})")


def result_keys(task) -> list[str]:
    """The '<metric>,<filter>' keys a task's results will have: each metric under each filter, a
    metric with a k argument (pass_at_k) as pass@k for each of its k (stderrs left out)."""
    names = []
    for name, kwargs in task._metric_fn_kwargs.items():
        ks = kwargs.get("k")
        names += [f"pass@{k}" for k in (ks if isinstance(ks, list) else [ks])] if ks is not None else [name]
    return [f"{name},{ensemble.name}" for name in names for ensemble in task._filters]


def check_metric(task, metric: str) -> None:
    """``task.metric`` is a key of the task's results: found out before the model loads, not after
    the whole evaluation."""
    keys = result_keys(task)
    if metric not in keys:
        raise ValueError(f"task.metric={metric!r} is not among lm-eval task {task.config.task!r}'s results {keys}")


def _number(value) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None  # lm-eval writes "N/A" when a stderr is undefined


def primary_metric(results: dict, task: str, metric: str) -> tuple[float, float | None]:
    table = results["results"].get(task)
    if table is None:
        raise ValueError(f"lm-eval returned no results for {task!r} (got {sorted(results['results'])})")
    if metric not in table:
        available = sorted(k for k in table if "," in k and "_stderr" not in k)
        raise ValueError(f"task.metric={metric!r} is not among {task}'s results {available}")
    name, filt = metric.split(",", 1)
    value = _number(table[metric])
    if value is None:
        raise ValueError(f"{task} {metric} = {table[metric]!r} is not a number")
    return value, _number(table.get(f"{name}_stderr,{filt}"))


def other_metrics(results: dict, task: str, metric: str) -> dict[str, float]:
    """The task's numeric results besides the primary ``metric`` (no stderrs): math_verify beside
    MATH's exact match, pass@k beside pass@1, the other filter of GSM8K ..."""
    table = results["results"].get(task, {})
    return {
        key: number for key, value in table.items()
        if "," in key and "_stderr" not in key and key != metric and (number := _number(value)) is not None
    }


def join_samples(results: dict, lm, metric: str) -> list[dict]:
    """One object per scored document: lm-eval's target, filtered answer and score, joined by
    (task, doc_id) with what the model did (prompt, generation, tokens, seconds / likelihoods)."""
    name, filt = metric.split(",", 1)
    out = []
    for task, samples in sorted((results.get("samples") or {}).items()):
        for s in samples:
            if s.get("filter") != filt:
                continue
            own = lm.records.get((task, s["doc_id"]), [])
            filtered = s.get("filtered_resps") or []
            score = s.get(name)
            row = {
                "task": task,
                "doc_id": s["doc_id"],
                "target": s.get("target"),
                "filtered_response": filtered[0] if len(filtered) == 1 else filtered,
                "metric": name,
                "score": score,
                "correct": bool(score) if isinstance(score, (int, float)) else None,
            }
            if len(own) == 1:
                row.update(own[0])
            else:
                row["requests"] = own
            out.append(row)
    return out


def _experiment(cfg: DictConfig) -> str | None:
    value = _get(cfg, "experiment")
    if isinstance(value, DictConfig):
        value = _get(value, "name")
    return None if value is None else str(value)


# Config keys that cannot change a number: where records go, how they are logged, resume itself.
# device and dtype enter the key resolved (auto -> the device type and dtype that run).
NOT_IN_KEY = ("results_csv", "force", "logger", "hydra", "debug", "device", "dtype")


def run_settings(cfg: DictConfig, plan, checkpoint: dict, processes: int = 1) -> dict:
    """Everything that can change a number of this run (its resume key hashes this): the resolved
    config minus ``NOT_IN_KEY`` (and minus ``compile`` when false), with ``threads`` resolved (auto
    on another machine is another thread count, another speed), plus the device type, dtype, the
    checkpoint's identity (:func:`dllm.pipeline.checkpoint_identity`), what its files are now
    (:func:`files_state`: weights rewritten in the same folder, e.g. by retraining, are another
    model), the content of any file a cache or decoding parameter names (pc_sampler's
    ``frequencies``) and of a ``task.include_path`` folder outside the bundled ones, and the number
    of data-parallel processes when it is more than one.

    Equal settings spelled differently hash alike: an integer given for a float parameter
    (``decoding.temperature=0``, ``decoding.cfg_scale=0``) is that float, ``task.gen_length`` is the response length that
    runs (``gen_length=16`` and ``task.gen_length=16`` are one run), and a Hub checkpoint's
    ``model.revision`` is the commit it resolved to (``main`` or null, and that commit, are one).
    Settings spelled the default way keep the keys they had before these rules (but for Hub
    checkpoints, whose key now has their commit)."""
    from dllm.cache.base import REGISTRY as CACHES
    from dllm.decoding.base import REGISTRY as DECODERS

    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IN_KEY:
        tree.pop(key, None)
    if not plan.compile:  # in the key only when on: eager runs keep the keys of rows recorded before it existed
        tree.pop("compile", None)
    tree["threads"] = plan.threads
    for group, registry in (("cache", CACHES), ("decoding", DECODERS)):
        params = dict(tree[group])
        name = params.pop("name", None)
        tree[group] = {"name": name, **registry.canonical(name, params)}
    # cfg_scale is the loop's, not the decoder class's: canonical does not see it (cfg_scale=0 is 0.0)
    if type(tree["decoding"].get("cfg_scale")) is int:
        tree["decoding"]["cfg_scale"] = float(tree["decoding"]["cfg_scale"])
    if isinstance(task := tree.get("task"), dict):
        if "gen_length" in task:
            task["gen_length"] = plan.gen_length
        if "batch_size" in task:  # batch_size=N is task.batch_size=N
            task["batch_size"] = tree.get("batch_size")
        for cut in ("cut_at_eos", "cut_at_until"):
            if task.get(cut) is True:  # the default, spelled out
                del task[cut]
    if checkpoint["checkpoint_revision"] is not None:  # a Hub checkpoint: the commit it resolved to says it all
        tree["model"]["revision"] = None
    settings = {**tree, "device_type": plan.device.type, "dtype": str(plan.dtype).removeprefix("torch."), **checkpoint}
    if processes > 1:  # in the key only then: one-process runs keep the keys recorded before it was
        settings["processes"] = processes
    folder = Path(checkpoint["checkpoint"])
    if folder.is_dir():
        settings["checkpoint_files"] = files_state(folder)
    named = {f"{group}.{key}": Path(value).expanduser() for group in ("cache", "decoding")
             for key, value in tree[group].items() if isinstance(value, str) and Path(value).expanduser().is_file()}
    if named:
        settings["input_files"] = {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in named.items()}
    # A task folder of one's own: its resolved path (a relative one depends on where the run
    # starts) and its files (they can change); a bundled one by its name however it was spelled
    # (``arith`` or its absolute path), as the code's own files.
    bundled = TASKS_ROOT.resolve()
    include = _get(cfg, "task.include_path")
    folders = [Path(p) for p in resolve_include_path(include)]
    if folders:
        named = [str(f.relative_to(bundled)) if f.is_relative_to(bundled) else str(f) for f in folders]
        settings["task"]["include_path"] = named[0] if isinstance(include, str) else named
    if outside := [f for f in folders if not f.is_relative_to(bundled)]:
        settings["task_files"] = {str(f): folder_contents(f) for f in outside}
        for folder in outside:
            settings["task_files"].update({str(path): path_contents(path) for path in files_read_by(folder)
                                           if not any(path.is_relative_to(f) for f in outside)})
    return settings


def files_read_by(folder: Path) -> set[Path]:
    """The paths that the task YAMLs under ``folder`` name, as lm-eval and datasets resolve them:
    each ``include`` (followed; relative to the including YAML), a ``dataset_path`` that is a local
    file or folder, and every file matched by ``dataset_kwargs.data_files`` (a path or glob, a list,
    or a dict of splits; relative to a local ``dataset_path``, else to the working directory). Data
    that a ``custom_dataset`` function opens by itself is not seen (keep it in the task folder)."""
    import glob

    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    found: set[Path] = set()
    pending = sorted(folder.rglob("*.yaml"))
    seen: set[Path] = set()
    while pending:
        path = pending.pop().resolve()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            config = load_yaml(path, resolve_func=False, recursive=False)
        except (yaml.YAMLError, ValueError):  # not a task lm-eval could load: no run reads through it
            continue
        found.add(path)
        includes = config.get("include") or []
        pending += [path.parent / inc for inc in (includes if isinstance(includes, list) else [includes])]
        dataset_path = Path(str(config.get("dataset_path", ""))).expanduser()
        local = str(dataset_path) not in ("", ".") and dataset_path.exists()
        if local:
            found.add(dataset_path.resolve())
        data_files = (config.get("dataset_kwargs") or {}).get("data_files") or []
        if isinstance(data_files, dict):
            data_files = list(data_files.values())
        base = dataset_path if local and dataset_path.is_dir() else Path.cwd()
        for pattern in data_files if isinstance(data_files, list) else [data_files]:
            for item in pattern if isinstance(pattern, list) else [pattern]:
                found.update(Path(hit).resolve() for hit in glob.glob(str(base / Path(str(item)).expanduser()),
                                                                      recursive=True) if Path(hit).is_file())
    return found


def path_contents(path: Path) -> str:
    """A hash of a file's bytes, or of a folder's files (:func:`folder_contents`)."""
    return folder_contents(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def folder_contents(folder: Path) -> str:
    """A hash of the relative path and bytes of every file under ``folder`` (a task folder: a few
    YAML, Python and data files)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def files_state(folder: Path) -> str:
    """A hash of the name, size and modification time of every file in ``folder``: cheap for an
    8B checkpoint, and it changes whenever a file is rewritten."""
    state = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def _identity(cfg: DictConfig, settings: TaskSettings, plan, processes: int = 1) -> dict:
    """The RunRecord fields that say *what* was measured, known before the model loads; their
    ``run_key`` is the hash of :func:`run_settings`."""
    from dllm.logging.record import settings_key
    from dllm.pipeline import checkpoint_identity, component

    decoding_name, decoding_params = component(cfg.decoding, "decoding")
    cache_name, cache_params = component(cfg.cache, "cache")
    checkpoint = checkpoint_identity(cfg)
    return dict(
        model=str(cfg.model.name),
        **checkpoint,
        cache=cache_name,
        cache_params=cache_params,
        decoding=decoding_name,
        decoding_params=decoding_params,
        task=settings.name,
        lm_eval_task=settings.lm_eval_task,
        code_scoring=settings.code_scoring,
        chat=bool(cfg.model.instruct),
        cut_at_eos=settings.cut_at_eos,
        cut_at_until=settings.cut_at_until,
        n_shot=settings.n_shot,
        limit=settings.limit,
        batch_size=int(cfg.batch_size),
        gen_length=plan.gen_length,
        steps=decoding_params.get("steps"),
        block_length=decoding_params.get("block_length", plan.gen_length),
        seed=int(cfg.seed),
        experiment=_experiment(cfg),
        threads=plan.threads,
        processes=processes,
        run_key=settings_key(run_settings(cfg, plan, checkpoint, processes)),
    )


def _done(cfg: DictConfig, key: str, dp) -> bool:
    """Resume: an ok row with this key is already in results_csv (rank 0 decides for all ranks)."""
    from dllm.logging.sinks import existing_keys

    if bool(_get(cfg, "force", False)):
        return False
    done = key in existing_keys(cfg.results_csv) if dp is None or dp.is_main else None
    return done if dp is None else dp.broadcast(done)


def _skip_message(cfg: DictConfig, identity: dict, key: str) -> None:
    log.info(
        "skip (exists): %s cache=%s task=%s seed=%s already has an ok row (key %s) in %s; force=true re-runs it",
        identity["model"], identity["cache"], identity["task"], identity["seed"], key, cfg.results_csv,
    )


def preflight_eval(cfg: DictConfig, dp=None) -> tuple[TaskSettings, "RunPlan", dict | None]:
    """Every check of an evaluation before anything loads (a sweep makes them for all its jobs
    first): the task settings, ``results_csv``, the run plan and the checkpoint's config.json and
    safetensors headers, the logger. ``dp`` (torchrun) pins each rank's device before the plan."""
    from dllm.logging.sinks import check_results_csv
    from dllm.pipeline import check_checkpoint, check_interpolations, plan_run

    check_interpolations(cfg)
    settings = check_task(cfg)
    check_results_csv(cfg.results_csv)  # a foreign, cut or write-protected file: refused before the load
    if dp is not None:
        dp.pin_device(str(cfg.device))
    plan = plan_run(cfg)
    check_checkpoint(cfg, plan)  # config.json and safetensors headers, before any weight
    return settings, plan, check_logger(cfg)


def run_eval(cfg: DictConfig) -> dict | None:
    """Validate everything; skip (return None) if results_csv already holds this run's ok row
    (unless ``force=true``); else load the model, evaluate, write run dir / W&B / CSV row; the row.
    Under torchrun (WORLD_SIZE > 1) every rank evaluates its share and rank 0 writes the record
    (the other ranks return None)."""
    from dllm.logging.record import new_run_id
    from dllm.pipeline import run_dir_of

    from .distributed import DataParallel

    run_id, started_at = new_run_id(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    dp = DataParallel.from_env()
    settings, plan, wandb_settings = preflight_eval(cfg, dp)
    if settings.num_return_sequences > 1 and plan.decoder.temperature == 0:
        log.warning("task.num_return_sequences=%d with greedy decoding: the samples of a problem are identical "
                    "(set decoding.temperature > 0 for pass@k)", settings.num_return_sequences)
    if dp is not None:
        dp.init(plan.device)
    try:
        identity = _identity(cfg, settings, plan, 1 if dp is None else dp.world_size)
        if _done(cfg, identity["run_key"], dp):  # fast path: before indexing lm-eval's tasks
            return _skip_message(cfg, identity, identity["run_key"])
        quiet_console(dp is None or dp.is_main)  # before lm-eval indexes and loads the task
        manager = task_manager(settings)  # an unknown lm-eval task name fails here, before the load
        tasks = tasks_to_run(settings, manager)
        run_dir = run_dir_of(cfg)
        previous = os.environ.get(CODE_EVAL_ENV)
        if settings.allow_code_execution:
            os.environ[CODE_EVAL_ENV] = "1"  # for this run only (a multirun's next job starts clean)
        try:
            return _evaluate(cfg, settings, plan, manager, tasks, wandb_settings, run_dir, run_id, started_at, identity, dp)
        finally:
            if previous is None:
                os.environ.pop(CODE_EVAL_ENV, None)
            else:
                os.environ[CODE_EVAL_ENV] = previous
    finally:
        if dp is not None:
            dp.close()


def _evaluate(
    cfg, settings: TaskSettings, plan, manager, tasks: list, wandb_settings, run_dir: Path, run_id: str, started_at: str,
    identity: dict, dp=None,
) -> dict | None:
    from lm_eval import simple_evaluate

    from dllm.logging.record import RunRecord, git_commit
    from dllm.logging.sinks import ResultsCsvError, WandbSink, append_csv, write_run_dir
    from dllm.pipeline import checkpoint_folder, config_sha256, load_model_and_tokenizer

    from .lm import DllmLM

    is_main = dp is None or dp.is_main
    if is_main:
        print(
            f"[run] model={identity['model']} ({identity['checkpoint']}) cache={identity['cache']} "
            f"decoding={identity['decoding']} task={settings.name} (lm-eval {settings.lm_eval_task}"
            f"{', code scoring ' + settings.code_scoring if settings.code_scoring else ''}) gen_length={plan.gen_length} "
            f"batch_size={cfg.batch_size} device={plan.device} dtype={str(plan.dtype).removeprefix('torch.')} "
            f"threads={plan.threads}{' x ' + str(dp.world_size) + ' ranks' if dp else ''}"
        )
    torch.manual_seed(cfg.seed)
    net, tokenizer = load_model_and_tokenizer(cfg, plan)
    lm = DllmLM(
        net, tokenizer, plan, batch_size=cfg.batch_size, chat=bool(cfg.model.instruct), seed=cfg.seed,
        mc_num=settings.mc_num, cut_at_eos=settings.cut_at_eos, cut_at_until=settings.cut_at_until,
        timing_repeats=int(_get(cfg, "timing.repeats", 1)), progress=is_main,
        **({"rank": dp.rank, "world_size": dp.world_size} if dp else {}),
    )
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=settings.n_shot,
        limit=settings.limit,
        task_manager=manager,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        log_samples=True,
        apply_chat_template=bool(cfg.model.instruct),
        fewshot_as_multiturn=settings.fewshot_as_multiturn,
        confirm_run_unsafe_code=settings.allow_code_execution,
    )
    if dp is not None:  # every rank's speed totals and per-sample records to rank 0, which writes
        from dllm.metrics.accounting import ThroughputMeter

        parts = lm.gather_object((lm.meter, lm.records))
        if not dp.is_main:
            return None
        lm.meter = ThroughputMeter.merge([meter for meter, _ in parts])
        lm.records = {k: v for _, records in parts for k, v in records.items()}
    accuracy, stderr = primary_metric(results, settings.lm_eval_task, settings.metric)
    samples = join_samples(results, lm, settings.metric)

    # The few-shot count lm-eval used (a task fixed at 0 shots, like HumanEval, ignores overrides).
    n_shot = results.get("n-shot", {}).get(settings.lm_eval_task, identity["n_shot"])
    speed = lm.meter.summary()
    speed["n_samples"] = len(samples)
    # A Hub checkpoint's config hash is known once it is fetched (a local one's before the load).
    config_hash = identity["checkpoint_config_sha256"] or config_sha256(checkpoint_folder(cfg))
    record = RunRecord(
        run_id=run_id,
        started_at=started_at,
        git_commit=git_commit(),
        **{**identity, "n_shot": n_shot, "checkpoint_config_sha256": config_hash},
        device=str(plan.device),
        gpu_name=torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else None,
        dtype=str(plan.dtype).removeprefix("torch."),
        compile=plan.compile,
        accuracy_metric=settings.metric,
        accuracy=accuracy,
        accuracy_stderr=stderr,
        other_metrics=other_metrics(results, settings.lm_eval_task, settings.metric),
        status="ok",
        run_dir=str(run_dir),
        **speed,
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    write_run_dir(run_dir, record, samples, OmegaConf.to_yaml(cfg, resolve=True))
    lm_eval_summary = {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples") if k in results}
    (run_dir / "lm_eval_results.json").write_text(json.dumps(lm_eval_summary, indent=2, default=str) + "\n")
    if wandb_settings is not None:
        WandbSink(
            project=wandb_settings["project"], mode=wandb_settings.get("mode"), entity=wandb_settings.get("entity"),
            group=wandb_settings.get("group") or record.experiment,  # a sweep's runs: one group per experiment
            tags=list(wandb_settings.get("tags") or []), run_dir=run_dir,
        ).log(record, samples, config)
    try:
        append_csv(cfg.results_csv, record.to_row())
    except ResultsCsvError as err:  # the CSV changed during the run: the record is not lost
        raise ResultsCsvError(f"{err}. This run's record is in {run_dir}/metrics.json; after the fix, "
                              f"python scripts/repair_csv.py {cfg.results_csv} --append {run_dir} adds it") from err
    _print_summary(record, cfg.results_csv)
    return record.to_row()


def _fmt(value, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _print_summary(record, csv_path) -> None:
    acc = _fmt(record.accuracy)
    if record.accuracy_stderr is not None:
        acc += f" ± {_fmt(record.accuracy_stderr)}"
    print(
        f"\n[{record.task}] {record.model} cache={record.cache} decoding={record.decoding}: "
        f"{record.accuracy_metric} = {acc} over {record.n_samples} samples\n"
        f"  throughput {_fmt(record.throughput_useful_tok_s, '.1f')} useful tok/s "
        f"({_fmt(record.throughput_all_tok_s, '.1f')} all tok/s), latency p50 {_fmt(record.latency_s_p50, '.3f')} s, "
        f"nfe {record.nfe}, recompute ratio {_fmt(record.recompute_ratio, '.3f')} "
        f"(ideal speedup {'n/a' if record.ideal_speedup is None else format(record.ideal_speedup, '.2f') + 'x'})\n"
        + (f"  compiled: {record.recompiles} graph(s) in {_fmt(record.compile_seconds, '.1f')} s (not in the timings), "
           f"bucket padding {_fmt(record.padding_ratio, '.3f')} of full-forward rows\n" if record.compile else "")
        + f"  row -> {csv_path}; run dir -> {record.run_dir}"
    )
