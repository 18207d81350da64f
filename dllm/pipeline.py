"""Config -> (validated plan) -> model -> generation or lm-eval -> records.

Everything that can be wrong with a config is checked in :func:`plan_run`, before any weight
is read, so a typo costs seconds, not a model load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dllm import REPO_ROOT, SEED_BOUND
from dllm.cache.base import CacheMethod, build_cache
from dllm.decoding.base import Decoder, build_decoder
from dllm.decoding.loop import check_block_causal, check_guidance
from dllm.devices import resolve_device, resolve_dtype
from dllm.models.loading import FAMILY_OF_NAME

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    decoder: Decoder
    cache: CacheMethod
    gen_length: int
    device: torch.device
    dtype: torch.dtype
    threads: int  # torch's intra-op CPU threads for this run
    stop_at_eos: bool = False  # decoding.stop_at_eos: a loop option, not the decoder's
    cfg_scale: float = 0.0  # decoding.cfg_scale: classifier-free guidance, a loop option
    compile: bool = False  # run the layers compiled (dllm.models.compiled), after loading


# torch's own thread count, taken when this module is imported, before any run sets one (run.py imports
# it before its first job): ``threads=auto`` must resolve alike in every job of a sweep run in one
# process, not to the count the previous job set.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def resolve_threads(value) -> int:
    """``threads``: an integer >= 1, or ``auto``: $OMP_NUM_THREADS, else $SLURM_CPUS_PER_TASK (the
    cores a job was given), else torch's default. torch's default takes every core it sees, which
    on a machine shared with other work (or a SLURM job given fewer cores) oversubscribes them."""
    cores = os.cpu_count() or 1
    if value == "auto":
        for variable in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
            text = os.environ.get(variable, "").strip()
            if text and not (text.isdigit() and int(text) >= 1):  # libgomp too ignores it, with a warning
                raise ValueError(f"threads=auto takes ${variable}={text!r}, which is no number of threads (allowed: "
                                 f"1 to {cores}; or set threads)")
            if text:
                if int(text) > cores:  # as threads=N: more threads than cores only contend for them
                    raise ValueError(f"threads=auto takes ${variable}={text}, more than this machine's {cores} cores "
                                     f"(allowed: 1 to {cores}; or set threads)")
                return int(text)
        return TORCH_DEFAULT_THREADS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cores:
        raise ValueError(f"threads={value!r} must be auto or an integer from 1 to {cores} (this machine's cores)")
    return value


def component(node: DictConfig, what: str) -> tuple[str, dict]:
    params = OmegaConf.to_container(node, resolve=True)
    if "name" not in params:
        raise ValueError(f"the {what} config has no 'name'")
    return params.pop("name"), params


# Each timing repeat generates every batch again: a mistyped count would run for days.
TIMING_REPEATS_BOUND = 101


def integer_setting(cfg: DictConfig, key: str, minimum: int, below: int | None = None) -> int:
    """``cfg.<key>`` checked to be an integer >= ``minimum`` and < ``below`` (a bool, float or text is refused)."""
    value = OmegaConf.select(cfg, key)
    too_big = below is not None and isinstance(value, int) and value >= below
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_big:
        limit = f" and < {below}" if below is not None else ""
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}{limit}")
    return value


def boolean_setting(cfg: DictConfig, key: str, default: bool | None = None) -> bool:
    """``cfg.<key>`` (``default`` where the config lacks it) checked to be true or false (Hydra keeps
    ``maybe`` as a text, which reads as true)."""
    value = OmegaConf.select(cfg, key, default=default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")
    return value


def check_interpolations(cfg: DictConfig) -> None:
    """Every ``${...}`` of the config resolves. An experiment looks its settings up per task, model
    or method (``${paper.n_shot.${task.name}}``); one it has none for is refused naming the setting,
    the table it reads and that table's entries, rather than with OmegaConf's three-line error."""
    from omegaconf.errors import InterpolationKeyError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationKeyError as err:
        found = re.match(r"Interpolation key '([^']+)' not found", str(err.msg))
        if not found:
            raise
        table, _, entry = found[1].rpartition(".")
        entries = OmegaConf.select(cfg, table) if table else None
        experiment = f"+experiment={cfg.experiment}: " if OmegaConf.select(cfg, "experiment") else ""
        allowed = f" (allowed: {', '.join(map(str, entries))})" if OmegaConf.is_dict(entries) else ""
        raise ValueError(f"{experiment}{err.full_key} reads {found[1]}, which is not set: {table or 'the config'} "
                         f"has no entry {entry!r}{allowed}") from None


def plan_run(cfg: DictConfig) -> RunPlan:
    """The validated run settings (no file or network is read; see :func:`check_checkpoint`)."""
    if cfg.model.family not in FAMILY_OF_NAME:
        raise ValueError(f"model.family={cfg.model.family!r} (allowed: {sorted(FAMILY_OF_NAME)})")
    for key in ("model.tiny", "model.instruct", "model.trust_remote_code", "force", "debug"):
        boolean_setting(cfg, key)
    # A tiny preset without a path (null) is the random-weight checkpoint; an empty text (model.path=, or
    # model.path=$UNSET_VARIABLE) would silently turn a trained preset into that, so it is refused.
    if cfg.model.path == "" or (cfg.model.path is None and not cfg.model.tiny):
        random = ", or null for random weights" if cfg.model.tiny else ""
        raise ValueError(f"model={cfg.model.name}: model.path={cfg.model.path!r} is empty (allowed: a Hub id, a local "
                         f"folder{random})")
    for key in ("prompt", "prompts_file"):
        if cfg.task.name != "generate" and (value := OmegaConf.select(cfg, key)) is not None:
            raise ValueError(f"{key}={value!r} applies to task=generate only (task={cfg.task.name} reads its own data)")
    integer_setting(cfg, "seed", 0, below=SEED_BOUND)
    for key, minimum in (("batch_size", 1), ("gen_length", 1)):
        integer_setting(cfg, key, minimum)
    integer_setting(cfg, "timing.repeats", 1, below=TIMING_REPEATS_BOUND)
    decoding_name, decoding_params = component(cfg.decoding, "decoding")
    cache_name, cache_params = component(cfg.cache, "cache")
    stop_at_eos = decoding_params.pop("stop_at_eos", False)
    if not isinstance(stop_at_eos, bool):
        raise ValueError(f"decoding.stop_at_eos={stop_at_eos!r} must be true or false")
    cfg_scale = decoding_params.pop("cfg_scale", 0.0)
    decoder = build_decoder(decoding_name, **decoding_params)
    cache = build_cache(cache_name, **cache_params)
    check_guidance(cfg_scale, cache, decoder)
    gen_length = int(cfg.gen_length)
    decoder.check(gen_length)
    cache.check(decoder)
    device = resolve_device(cfg.device)
    threads = resolve_threads(OmegaConf.select(cfg, "threads", default="auto"))
    compiled = OmegaConf.select(cfg, "compile", default=False)
    if not isinstance(compiled, bool):
        raise ValueError(f"compile={compiled!r} must be true or false")
    if compiled:
        from dllm.models.compiled import check_torch_version
        check_torch_version()
    return RunPlan(decoder, cache, gen_length, device, resolve_dtype(cfg.dtype, device), threads, stop_at_eos, cfg_scale,
                   compiled)


def check_model_fit(plan: RunPlan, logit_shift: int, block_causal: bool, vocab_size: int | None = None,
                    trained_block_length: int = 0) -> None:
    """The decoder and the cache method accept a model with this logit shift (1: Dream), attention
    (block-causal: a block-diffusion model) and vocabulary (None: not known before the load). A
    block-diffusion decoder whose block differs from the one the checkpoint was trained with
    (``trained_block_length``, 0: not known) is warned of, not refused: the authors' code lets one
    choose it, but the published numbers use the trained block."""
    if vocab_size is not None:
        plan.decoder.check_vocab(vocab_size)
    plan.decoder.check_model(logit_shift)
    plan.cache.check_model(logit_shift)
    check_block_causal(block_causal, plan.decoder, plan.cache)
    if block_causal and trained_block_length and plan.decoder.block_length != trained_block_length:
        log.warning("decoding.block_length=%d, but the model was trained with blocks of %d: its attention runs over "
                    "blocks it never saw in training (decoding.block_length=%d is its own)", plan.decoder.block_length,
                    trained_block_length, trained_block_length)


def check_checkpoint(cfg: DictConfig, plan: RunPlan) -> None:
    """Before any weight is read: the checkpoint's config.json is found (a local folder, or fetched
    alone from the Hub / its cache), describes the configured family, and leaves room for a prompt
    of at least one token before ``gen_length`` generated ones, and suits the cache method; a
    local folder's safetensors headers match it (a Hub checkpoint's shards: when fetched, at load)."""
    from dllm.models.loading import local_folder, model_args, plan_loading
    from dllm.models.tiny import BASE_ARGS, cache_root

    if cfg.model.tiny and not cfg.model.path:  # the random-weight tiny checkpoint, built on first use
        cache_root(cfg.model.family)  # where it is built: a folder something can be made in
        base = BASE_ARGS[cfg.model.family]
        check_model_fit(plan, base["logit_shift"], base.get("block_causal", False),
                        trained_block_length=base.get("trained_block_length", 0))
        check_room(cfg, plan, base["max_seq_len"], f"the random-weight {cfg.model.family} checkpoint")
        return
    path = local_or_repo_path(str(cfg.model.path))
    local = local_folder(path)
    if local is not None and cfg.model.revision is not None:  # it would only change the run key
        raise ValueError(f"model.revision={cfg.model.revision!r} names a Hub commit, branch or tag; model.path="
                         f"{str(cfg.model.path)!r} is a local folder, whose files are what runs (allowed: null)")
    folder = local if local is not None else _hub_config_folder(path, cfg.model.revision)
    args = model_args(folder, cfg.model.family)
    if local is not None:
        plan_loading(folder, args)  # every shard's header: names, shapes, a truncated file
    check_model_fit(plan, args.logit_shift, args.block_causal, args.vocab_size, args.trained_block_length)
    check_room(cfg, plan, args.max_seq_len, f"config.json in {folder}")


def check_room(cfg: DictConfig, plan: RunPlan, max_seq_len: int, source: str) -> None:
    """The response the loop lays out (``gen_length``, rounded up to whole blocks by a block-diffusion
    decoder) must leave room for a prompt of at least one token within ``max_seq_len``."""
    block = plan.decoder.block_length if plan.decoder.block_causal else None
    laid_out = -(-plan.gen_length // block) * block if block else plan.gen_length
    if laid_out >= max_seq_len:
        what = f"gen_length={plan.gen_length}" + (
            f" (laid out in blocks of decoding.block_length={block}: {laid_out} positions)" if laid_out != plan.gen_length
            else "")
        raise ValueError(f"{what} leaves no room for a prompt: model={cfg.model.name} has max_seq_len={max_seq_len} "
                         f"({source})")


def _hub_config_folder(repo: str, revision: str | None) -> Path:
    """The folder of a Hub checkpoint's config.json, fetched alone (or found in the HF cache)."""
    from huggingface_hub import hf_hub_download

    from dllm.models.loading import CheckpointError

    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision)).parent
    except Exception as err:  # offline and not cached, unknown repo, no access
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"model.path={repo!r}: cannot get its config.json from the Hugging Face Hub ({reason}). Download it first "
            f"where there is network (huggingface-cli download {repo}) or point at a local copy: model.path=/local/folder"
        ) from err


def local_or_repo_path(path: str) -> str:
    """A relative ``model.path`` that is not a folder under the working directory but is one
    under the repository root (e.g. the committed ``assets/tiny_llada``) resolves there, so
    ``python run.py`` works from any directory; anything else (Hub ids) passes through."""
    local = Path(path).expanduser()
    if not local.is_absolute() and not local.is_dir() and (REPO_ROOT / local).is_dir():
        return str(REPO_ROOT / local)
    return path


def config_sha256(folder: Path) -> str | None:
    """sha256 of a checkpoint folder's config.json (None where it has none)."""
    path = Path(folder) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def checkpoint_identity(cfg: DictConfig) -> dict:
    """What identifies the weights, known before they load: a local folder's absolute path and
    its config.json's hash, or a Hub id, the commit its revision resolves to now (``main`` when
    ``model.revision`` is null: a branch that moved on is another model) and its config.json's
    hash. The commit is the snapshot folder config.json was fetched into (or found in, offline),
    the one :func:`checkpoint_folder` then loads the weights from."""
    if cfg.model.tiny and not cfg.model.path:  # built by this code: its recipe version says which weights
        from dllm.models.tiny import CACHE_VERSION

        return {"checkpoint": f"tiny-random:{cfg.model.family}-{CACHE_VERSION}", "checkpoint_revision": None,
                "checkpoint_config_sha256": None}
    path = local_or_repo_path(str(cfg.model.path))
    local = Path(path).expanduser()
    if local.is_dir():
        return {"checkpoint": str(local.resolve()), "checkpoint_revision": None, "checkpoint_config_sha256": config_sha256(local)}
    snapshot = _hub_config_folder(path, cfg.model.revision)  # .../snapshots/<commit>/config.json
    return {"checkpoint": path, "checkpoint_revision": snapshot.name, "checkpoint_config_sha256": config_sha256(snapshot)}


def checkpoint_folder(cfg: DictConfig) -> Path:
    """The local folder of the checkpoint (a Hub id is fetched, or found in the HF cache)."""
    from dllm.models.loading import resolve_checkpoint

    if cfg.model.tiny and not cfg.model.path:
        # A tiny model without a path: the random-weight checkpoint, built on first use.
        from dllm.models.tiny import ensure_tiny

        return ensure_tiny(cfg.model.family)
    return resolve_checkpoint(local_or_repo_path(str(cfg.model.path)), cfg.model.revision)


def load_model_and_tokenizer(cfg: DictConfig, plan: RunPlan):
    from dllm.models.loading import load_model, model_args
    from dllm.models.packed import pack_linear_weights
    from dllm.models.tokenization import load_tokenizer

    torch.set_num_threads(plan.threads)
    folder = checkpoint_folder(cfg)
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)  # first: a folder without one fails in seconds
    check_tokenizer(cfg, tokenizer, model_args(folder, cfg.model.family), folder)
    net = load_model(str(folder), plan.device, plan.dtype, expected_family=cfg.model.family)
    pack_linear_weights(net)  # float32 on CPU only; see dllm/models/packed.py
    if plan.compile:
        import torch._dynamo as dynamo

        from dllm.models.compiled import compile_layers

        # A run's graphs are its own. Dynamo keeps graphs on the one compiled function for the
        # process's life, so in a sweep run in one process a later job on the same model structure
        # would reuse an earlier job's (compile_seconds 0, recompiles 0, unlike the job run alone),
        # and every job's graphs would count toward dynamo's recompile limit.
        dynamo.reset()
        compile_layers(net)  # graphs compile on first use: in the warm-up batch, left out of the timings
    return net, tokenizer


def check_tokenizer(cfg: DictConfig, tokenizer, args, folder: Path) -> None:
    """Before the weights load: the checkpoint's tokenizer fits its model. Its ids must be rows of
    the embedding (config.json's ``vocab_size``), and ``model.instruct`` needs its chat template
    (else an evaluation stops when lm-eval builds its contexts, and a prompt would run untemplated)."""
    largest = max(tokenizer.get_vocab().values())  # its added tokens included
    if largest >= args.vocab_size:
        raise ValueError(f"the tokenizer in {folder} has token ids up to {largest}, beyond the model's "
                         f"vocab_size={args.vocab_size} (config.json): tokenizer and weights are from different "
                         "checkpoints")
    if cfg.model.instruct and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model.instruct=true, but the tokenizer in {folder} has no chat template "
                         "(tokenizer_config.json's chat_template): add one, or run the prompts as plain text with "
                         "model.instruct=false")


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise ValueError("give either prompt=... or prompts_file=..., not both")
    for key in ("prompt", "prompts_file"):
        if OmegaConf.is_config(cfg[key]):  # a list or a mapping: prompt=[a,b] is not a text
            raise ValueError(f"{key}={OmegaConf.to_container(cfg[key])!r} must be a text (prompt='What is 7 * 6?', "
                             "prompts_file=prompts.jsonl; several prompts: a prompts_file)")
    if cfg.prompt is not None:
        prompts, source = [str(cfg.prompt)], "prompt"
    elif cfg.prompts_file is None:
        source = "task.prompts"
        given = cfg.task.prompts
        # a number is the text Hydra read it from (task.prompts=[42]); a list, mapping, null or bool is no text
        if not OmegaConf.is_list(given) or not len(given) or any(
                OmegaConf.is_config(p) or p is None or isinstance(p, bool) for p in given):
            raise ValueError(f"task.prompts={OmegaConf.to_container(cfg.task, resolve=True).get('prompts')!r} "
                             "(allowed: a non-empty list of texts, task.prompts='[What is 7 * 6?]')")
        prompts = [str(p) for p in given]
    else:
        given = str(cfg.prompts_file)
        path = Path(given)
        if not given.strip() or not path.is_file():
            why = ("is empty" if not given.strip() else "is a folder" if path.is_dir()
                   else "is not a regular file" if path.exists() else "does not exist")
            raise ValueError(f"prompts_file={given!r} {why} (allowed: a jsonl file, one {{\"prompt\": ...}} per line)")
        prompts = read_prompts_file(path)
        if not prompts:
            raise ValueError(f"prompts_file={str(path)!r} holds no prompts")
        source = f"prompts_file={str(path)!r}"
    if any(not str(p).strip() for p in prompts):
        raise ValueError(f"{source}: an empty prompt (give the text to continue, e.g. prompt='What is 7 * 6?')")
    return prompts


def read_prompts_file(path: Path) -> list[str]:
    """The prompts of a jsonl file, one {"prompt": "..."} per line (blank lines skipped); a bad line is
    named by its number."""
    prompts = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts_file={str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompts_file={str(path)!r} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{where}: {line.strip()[:60]!r} (allowed: an object with a text "prompt", '
                             '{"prompt": "What is 7 * 6?"})')
        prompts.append(record["prompt"])
    return prompts


def run_dir_of(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/runs/manual")


def log_compiled(out, what: str) -> None:
    """Log the graphs a generation compiled (compiled layers; its seconds leave that time out)."""
    if out.recompiles:
        log.info("%s: compiled %d new graph(s) in %.1f s (not in its timing)", what, out.recompiles, out.compile_seconds)


def preflight_generate(cfg: DictConfig) -> tuple[RunPlan, list[str]]:
    """Every check of ``task=generate`` before anything loads: the plan, the prompts, the checkpoint,
    and for a local checkpoint the prompts' room (:func:`check_prompt_room`)."""
    check_interpolations(cfg)
    plan = plan_run(cfg)
    prompts = read_prompts(cfg)
    check_checkpoint(cfg, plan)
    check_prompt_room(cfg, plan, prompts)
    return plan, prompts


def check_prompt_room(cfg: DictConfig, plan: RunPlan, prompts: list[str]) -> None:
    """A local checkpoint's tokenizer (read before its weights) encodes the prompts as the run will,
    and each batch of them, laid out with ``gen_length``, must fit the checkpoint's ``max_seq_len``
    (else the run would stop at its first generation). The random-weight tiny checkpoints and Hub
    ones are built or fetched at the run, which checks the same there."""
    from dllm.decoding.layout import grid_width
    from dllm.models.loading import local_folder, model_args
    from dllm.models.tokenization import encode_prompts, load_tokenizer

    folder = local_folder(local_or_repo_path(str(cfg.model.path))) if cfg.model.path else None
    if folder is None:
        return
    args = model_args(folder, cfg.model.family)
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    check_tokenizer(cfg, tokenizer, args, folder)
    ids = encode_prompts(tokenizer, prompts, chat=cfg.model.instruct)
    block = plan.decoder.block_length if args.block_causal else None
    for start in range(0, len(ids), cfg.batch_size):
        batch = ids[start : start + cfg.batch_size]
        width = grid_width([len(prompt) for prompt in batch], plan.gen_length, block)
        if width > args.max_seq_len:
            longest = start + max(range(len(batch)), key=lambda i: len(batch[i]))
            raise ValueError(f"prompt {longest} ({len(ids[longest])} tokens) + gen_length={plan.gen_length} lays out "
                             f"{width} positions, beyond model={cfg.model.name}'s max_seq_len={args.max_seq_len} "
                             f"(config.json in {folder}): shorten the prompt or gen_length")


def preflight(cfg: DictConfig, checked: dict | None = None) -> None:
    """Every check a run makes before it loads its weights (ValueError naming the first bad value),
    for a sweep's jobs before the first one runs: the checks of :func:`preflight_eval` /
    :func:`preflight_generate`, and those a run makes later, after its resume check: a local
    checkpoint's tokenizer, the lm-eval task (its name, data, shots and metric). ``checked`` (shared
    by the jobs of a sweep) remembers the tokenizers and tasks already checked."""
    from dllm.models.loading import local_folder, model_args
    from dllm.models.tokenization import load_tokenizer

    checked = {} if checked is None else checked
    if cfg.task.name == "generate":
        preflight_generate(cfg)
    else:
        from dllm.eval.runner import preflight_eval, quiet_console, task_manager, tasks_to_run

        settings, _, _ = preflight_eval(cfg)
        quiet_console(True)  # lm-eval's warnings that do not apply, as in the run itself
        task_key = ("task", repr(settings))
        if task_key not in checked:
            managers = checked.setdefault("managers", {})
            where = (tuple(settings.include_path), settings.include_defaults)
            managers[where] = task_manager(settings, managers.get(where))
            tasks_to_run(settings, managers[where])
            checked[task_key] = True
        # (task=generate's check_prompt_room has read the tokenizer already)
        folder = local_folder(local_or_repo_path(str(cfg.model.path))) if cfg.model.path else None
        if folder is not None and ("tokenizer", str(folder), bool(cfg.model.instruct)) not in checked:
            tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
            check_tokenizer(cfg, tokenizer, model_args(folder, cfg.model.family), folder)
            checked["tokenizer", str(folder), bool(cfg.model.instruct)] = True


def run_generate(cfg: DictConfig) -> list[dict]:
    from dllm.decoding.loop import generate
    from dllm.models.tokenization import decode_responses, encode_prompts, stop_token_ids

    plan, prompts = preflight_generate(cfg)
    torch.manual_seed(cfg.seed)
    net, tokenizer = load_model_and_tokenizer(cfg, plan)
    stops = stop_token_ids(tokenizer, net.args)
    generator = torch.Generator(device=plan.device).manual_seed(cfg.seed)
    records = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        ids = encode_prompts(tokenizer, batch, chat=cfg.model.instruct)
        out = generate(net, ids, plan.decoder, plan.cache, plan.gen_length, generator, stop_at_eos=plan.stop_at_eos,
                       cfg_scale=plan.cfg_scale)
        log_compiled(out, f"batch {start // cfg.batch_size}")
        texts, lengths = decode_responses(tokenizer, out.tokens, stops)
        for prompt, text, n in zip(batch, texts, lengths):
            records.append({
                "prompt": prompt, "generation": text, "useful_tokens": n,
                "batch_seconds": out.seconds, "nfe": out.nfe, "recompute_ratio": out.recompute_ratio,
                "compile_seconds": out.compile_seconds, "recompiles": out.recompiles,
            })
            print(f"\n>>> {prompt}\n{text}")
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with open(run_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    log.info("wrote %s", run_dir)
    return records


def run(cfg: DictConfig):
    if cfg.task.name == "generate":
        return run_generate(cfg)
    from dllm.eval.runner import run_eval

    return run_eval(cfg)
