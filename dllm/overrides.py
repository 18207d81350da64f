"""Command-line overrides checked before Hydra composes them.

Hydra answers a bad override with a multi-line message and exit 1, or not at all: an unknown preset
(``cache=nosuch``) gets its options one per line; ``cache.kk=3`` gets "Key 'kk' is not in struct" and
the advice ``+cache.kk=3``, which only moves the failure; ``+cache.k=3`` on a key that exists is refused
in three lines; and ``+task.limt=4`` is accepted and never read (the code reads optional keys with a
default), so the run covers the whole task. This turns each into one line naming the bad value, the
close allowed ones and all of them, which run.py prints as ``error: ...`` with exit status 2.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
import shutil
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "cache", "decoding", "task", "logger", "experiment", "hydra/launcher")
# Keys added under these (+task.mc_num=2) must be keys some preset of the group defines: the code reads
# the optional ones with a default, so a mistyped one would be silently ignored. Keys added under
# cache / decoding are the method's parameters, which the registry names when the run is planned.
PRESET_KEYED = ("model", "task", "logger")
# (+ or ++, key or group, value); other hydra/ groups and hydra.* keys are Hydra's own to check.
_OVERRIDE = re.compile(r"^(\+{0,2})(hydra/launcher|[A-Za-z_][\w.]*)=(.*)$", re.S)


def preset_keys(group: str) -> dict[str, set[str]]:
    """The top-level keys of each conf/<group>/*.yaml, by preset name."""
    return {p.stem: set(yaml.safe_load(p.read_text()) or {}) - {"defaults"} for p in sorted((CONF / group).glob("*.yaml"))}


def _launcher_bases(option: str) -> list[str]:
    """The submitit launchers a hydra/launcher option is or builds on (through the conf/hydra/launcher
    presets it extends); none for Hydra's own (basic)."""
    if option.startswith("submitit"):
        return [option]
    path = CONF / "hydra" / "launcher" / f"{option}.yaml"
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", []) if path.is_file() else []
    return [base for d in defaults if isinstance(d, str) and d != "_self_" for base in _launcher_bases(d)]


def launcher_problem(option: str) -> str | None:
    """Why the launcher preset ``option`` cannot run from here (its plugin, or SLURM's sbatch, missing), or None."""
    bases = _launcher_bases(option)
    if not bases:
        return None
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return (f"hydra/launcher={option} needs hydra-submitit-launcher, which is not installed: "
                "pip install -e '.[slurm]'")
    if "submitit_slurm" in bases and shutil.which("sbatch") is None:
        return (f"hydra/launcher={option} submits the jobs with SLURM's sbatch, which is not on this machine's PATH: "
                "submit from a SLURM login node, or run the sweep here with hydra/launcher=local")
    return None


def _refusal(what: str, bad: str, allowed) -> str:
    allowed = sorted(allowed)
    return f"{what} (close: {difflib.get_close_matches(bad, allowed, n=3) or 'none'}; allowed: {allowed})"


def _composition_message(err) -> str:
    """Hydra's refusal to compose a config on one line; a missing preset named with its group's options."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return _refusal(f"{group}={option}: no such {group} option", option, err.options)
    return " ".join(str(err).split())


def _values(parser, arg: str, value: str) -> list[str]:
    """The values ``arg`` gives its key: each of a sweep's, as Hydra's sweeper expands it (``a,b``,
    ``choice(a,b)``, ``range(0,3)``, ``glob(a*)``: the options of the group that match), else ``value``."""
    (override,) = parser.parse_overrides([arg])
    return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else [value]


def _first_missing(cfg, key: str):
    """(the path of the deepest node on ``key``'s path that exists, the first part missing under it or
    None when the whole key exists, that node)."""
    from omegaconf import OmegaConf

    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not (OmegaConf.is_dict(node) and part in node):
            return ".".join(parts[:i]), part, node
        node = OmegaConf.select(node, part, throw_on_resolution_failure=False)
    return key, None, node


def unreadable_override_message(args: list[str]) -> str | None:
    """One line for the first override Hydra's grammar cannot read (``gen_length=32)``, full-width
    digits), or a sweep (``a,b``) without ``-m``, which Hydra would refuse in several lines."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as err:
            return f"{arg}: not an override Hydra can read ({' '.join(str(err).split())})"
        if override.is_sweep_override() and not multirun:
            key, _, value = arg.partition("=")
            return (f"{arg}: a comma-separated value is a sweep; add -m to run one job per value, or quote it to "
                    f"give the text itself: \"{key}='{value}'\"")
    return None


def unknown_key_message(args: list[str]) -> str | None:
    """One line naming the first bad override in ``args`` (command-line arguments), or None.

    Bad: a group option that is not a preset; a preset's ``name`` (``task.name=gsm8k``: choose the preset
    with ``task=gsm8k``); ``method=`` that is not one of the experiment's methods;
    an experiment reading ``model.published`` from a preset without it; a key under a node the
    experiment interpolates (``cache.k=3`` with ``cache: ${methods.${method}.cache}``: the line names
    the chosen method's key instead); ``+key=`` for a key that exists; a key the composed config lacks
    (one that a preset of its group defines must be added with ``+``); a sweep of no values (``glob(x*)``
    matching no option). Sweeps (``a,b``, ``choice(a,b)``, ``glob(a*)``) have each value of a group or
    method checked, keys against the first value."""
    if message := unreadable_override_message(args):
        return message
    overrides = [m.groups() for m in map(_OVERRIDE.match, args) if m and not m[2].startswith("hydra.")]
    if not overrides:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    selections = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)  # glob(...) lists a group's options through it
        picks = [_values(parser, f"{plus}{key}={value}", value) for plus, key, value in overrides]
        for (plus, key, value), values in zip(overrides, picks):
            if key in GROUPS:
                options = loader.get_group_options(key)
                if not values:
                    return _refusal(f"{key}={value}: matches no {key} option, so no job would run", value, options)
                for option in values:
                    if option not in options:
                        return _refusal(f"{key}={option}: no such {key} option", option, options)
                    if key == "hydra/launcher" and (problem := launcher_problem(option)):
                        return problem
                if key != "hydra/launcher":  # the launcher is not part of the run's config
                    selections.append(f"{plus}{key}={values[0]}")
            elif not values:  # range(1,1), or glob(...) on a key: Hydra would run no job
                hint = f" (glob() matches the options of a config group: {list(GROUPS)})" if "glob(" in value else ""
                return f"{key}={value}: a sweep of no values, so no job would run{hint}"
        try:
            cfg = compose("config", overrides=selections)
        except Exception as err:  # noqa: BLE001 - e.g. experiment=X without '+': Hydra's words, on one line
            return _composition_message(err)

    # An experiment's method picks its cache and decoding: check it, and name keys of its choice below.
    for (plus, key, value), values in zip(overrides, picks):
        if key == "method" and "methods" in cfg:
            for method in values:
                if method not in cfg.methods:
                    return _refusal(f"method={method} is not a method of experiment={cfg.experiment}", method, cfg.methods)
            cfg.method = values[0]
    if "published" not in cfg.model and "${model.published." in OmegaConf.to_yaml(cfg):
        with_published = [name for name, keys in preset_keys("model").items() if "published" in keys]
        return (f"experiment={cfg.experiment} uses the model preset's published settings (model.published), and "
                f"model={cfg.model.name} publishes none (presets that do: {with_published})")

    for plus, key, value in overrides:
        if key in GROUPS:
            continue
        group, _, rest = key.partition(".")
        if rest == "name" and group in GROUPS:
            # the preset's identity: task.name=gsm8k would run arith's settings and record them as gsm8k
            options = loader.get_group_options(group)
            return _refusal(f"{key}={value}: {group}.name is the {group} preset's own; choose a preset with "
                            f"{group}=<name>", value, options)
        if rest and group in cfg and OmegaConf.is_interpolation(cfg, group):
            # cache: ${methods.${method}.cache}: Hydra refuses cache.k=3 there, and +cache.k=3 or ++cache.k=3
            # replace the whole node by {k: 3}; the key is set where the interpolation points
            raw = OmegaConf.to_container(cfg, resolve=False)[group]
            target = re.sub(r"\$\{([\w.]+)\}", lambda m: str(OmegaConf.select(cfg, m[1])), raw[2:-1])
            return (f"{key}: experiment={cfg.experiment} sets {group}: {raw}, which Hydra cannot override "
                    f"through; set {plus}{target}.{rest}={value} instead")
        where, missing, node = _first_missing(cfg, key)
        if missing is None:
            if plus == "+":
                return f"+{key}={value}: {key} exists already; drop the '+' ({key}={value})"
            continue
        if not OmegaConf.is_dict(node) or (plus and "name" in node and where not in PRESET_KEYED):
            continue  # under a null node: Hydra's to check; in a cache or decoding method: the registry's
        allowed = set(node).union(*preset_keys(where).values()) if where in PRESET_KEYED else set(node)
        what = f"{where}={node.name}" if where in GROUPS and "name" in node else where or "the config"
        if missing not in allowed:
            return _refusal(f"{key}: {what} has no key {missing!r}", missing, allowed)
        if not plus:  # a key another preset of the group has (task.mc_num=2 on task=arith)
            return f"{key}: {what} has no key {missing!r}; add it with +{key}={value}"
    return None


def _task_overrides(args: list[str]) -> list[str]:
    """The overrides that make up a job's config (not flags, not Hydra's own settings)."""
    return [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]


_SWEEPER_PARAMS = "hydra.sweeper.params."


def _sweeper_params(args: list[str]) -> dict[str, str]:
    """The sweep values set on the command line as Hydra settings (``hydra.sweeper.params.seed=0,1``,
    ``+hydra.sweeper.params.seed=...``), by the key they sweep."""
    params = {}
    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key.startswith(_SWEEPER_PARAMS) and value:
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""  # '0,-1': Hydra's quotes
            params[key.removeprefix(_SWEEPER_PARAMS)] = value[1:-1] if quoted else value
    return params


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The override lists of a multirun's jobs, as Hydra's basic sweeper forms them: the experiment's
    ``hydra.sweeper.params`` first, then the command line, every combination of their values."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = _task_overrides(args)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # with the config loader, as the sweeper's: glob(...) expands to the options of its group
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
        params = dict(compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.params or {})
        params.update(_sweeper_params(args))  # the command line's own, over the experiment's
        lines = [f"{key}={value}" for key, value in params.items()] + overrides
        batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), max_batch_size=None)
    return [job for batch in batches for job in batch]


def refused_job_message(args: list[str]) -> str | None:
    """Before a multirun starts: one line for the first of its jobs whose settings a run would refuse
    before loading anything (:func:`dllm.pipeline.preflight`), naming the job, or None. So a bad value
    in a sweep (``-m seed=7,-1``) stops the sweep before its first job rather than after it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException

    from dllm.pipeline import preflight

    try:
        jobs = sweep_jobs(args)
    except HydraException as err:  # e.g. interval(...), which the basic sweeper does not run
        return _composition_message(err)
    checked: dict = {}  # the tokenizers and lm-eval tasks the jobs share, checked once
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for number, job in enumerate(jobs):
            try:
                preflight(compose("config", overrides=job), checked)
            except ValueError as err:
                return f"job {number + 1} of {len(jobs)} ({' '.join(job)}): {err}"
            except ConfigCompositionException as err:  # e.g. a missing preset the experiment sweeps
                return f"job {number + 1} of {len(jobs)} ({' '.join(job)}): {_composition_message(err)}"
    return None
