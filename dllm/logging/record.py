"""The run record: one flat row per run, the same in the CSV, the W&B summary and metrics.json."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import numbers
import secrets
import subprocess
from dataclasses import dataclass, field, fields

from dllm import REPO_ROOT

# Rows written before the ``run_key`` column existed are keyed by these columns (their settings as
# far as the row shows them); such a key never equals a ``run_key``, so resume re-runs those runs.
LEGACY_KEY_FIELDS = (
    "model", "cache", "decoding", "task", "n_shot", "limit", "batch_size", "gen_length",
    "steps", "block_length", "seed", "experiment",
)
LEGACY_KEY_PREFIXES = ("cache.", "decoding.")


def utc_now() -> str:
    """ISO 8601 UTC to the second: take it when a run starts, for ``started_at``."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """UTC time to the microsecond (ids sort by start time) + 8 random hex digits."""
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}"


def git_commit() -> str:
    """Short HEAD hash of this checkout, '+dirty' if tracked or new unignored files differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):  # no git binary, not a checkout, no commit yet
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@dataclass(kw_only=True)
class RunRecord:
    """Fields in DESIGN §7 order. Speed fields take ``ThroughputMeter.summary()`` as keywords."""

    run_id: str = field(default_factory=new_run_id)
    started_at: str = field(default_factory=utc_now)
    git_commit: str = field(default_factory=git_commit)
    model: str
    checkpoint: str | None = None  # the local folder (absolute) or the Hub id the weights came from
    checkpoint_revision: str | None = None
    checkpoint_config_sha256: str | None = None  # of the checkpoint's config.json
    cache: str
    cache_params: dict = field(default_factory=dict)
    decoding: str
    decoding_params: dict = field(default_factory=dict)
    task: str
    lm_eval_task: str | None = None  # the lm-eval task or group that ran (task is the Hydra preset)
    # code tasks: raw | sanitize | sanitize_no_prompt | raw_sanitize_no_prompt | sanitize_dream_prompt (README "Tasks and records")
    code_scoring: str | None = None
    chat: bool | None = None  # the prompts went through the tokenizer's chat template (model.instruct)
    cut_at_eos: bool | None = None  # False: text after the first EOS kept, as LLaDA's eval_llada.py (task.cut_at_eos)
    cut_at_until: bool | None = None  # False: the stop strings do not cut the text, Dream's escape_until (task.cut_at_until)
    n_shot: int | None = None
    limit: int | float | None = None
    batch_size: int | None = None
    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    seed: int | None = None
    device: str | None = None
    gpu_name: str | None = None
    dtype: str | None = None
    threads: int | None = None  # torch's CPU threads per process (``threads``, resolved)
    processes: int | None = None  # data-parallel processes (torchrun ranks) that shared the documents
    compile: bool | None = None  # the layers ran compiled (``compile: true``, dllm.models.compiled)
    accuracy_metric: str | None = None
    accuracy: float | None = None
    accuracy_stderr: float | None = None
    #: the task's other metrics ("<metric>,<filter>" -> value), e.g. math_verify beside MATH's exact
    #: match or pass@k beside pass@1; columns ``metrics.<metric>,<filter>``
    other_metrics: dict = field(default_factory=dict)
    n_samples: int | None = None
    useful_tokens: int | None = None
    all_tokens: int | None = None
    gen_seconds: float | None = None
    throughput_useful_tok_s: float | None = None
    throughput_all_tok_s: float | None = None
    timing_repeats: int | None = None
    throughput_useful_tok_s_std: float | None = None  # over timing repeats (None with one)
    throughput_all_tok_s_std: float | None = None
    latency_s_mean: float | None = None
    latency_s_p50: float | None = None
    latency_s_p90: float | None = None
    nfe: int | None = None
    tokens_per_forward: float | None = None
    recompute_ratio: float | None = None
    ideal_speedup: float | None = None
    attention_ratio: float | None = None  # attended query-key pairs / those of full forwards
    ideal_speedup_attention: float | None = None  # full FLOPs / FLOPs, linear layers + attention
    peak_mem_gb: float | None = None
    peak_kv_gb: float | None = None  # the most K/V one forward attended to
    mask_tokens_left: int | None = None
    remasked_tokens: int | None = None  # committed tokens a re-masking decoder took back
    compile_seconds: float | None = None  # compiling new graphs, warm-up included (not in gen_seconds)
    recompiles: int | None = None  # graphs compiled during the run, warm-up included
    padding_ratio: float | None = None  # bucket padding token-layers / full-forward token-layers
    status: str = "ok"
    experiment: str | None = None
    run_dir: str | None = None
    run_key: str | None = None  # settings_key of everything that can change a number (resume)

    def to_row(self) -> dict:
        """Flat dict in field order; the dict fields become columns named with their
        :data:`FLATTENED` prefix (params sorted, nested dicts dotted; other metrics sorted)."""
        row: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "other_metrics":
                row.update({f"{FLATTENED[f.name]}.{name}": _scalar(v) for name, v in sorted(value.items())})
            elif f.name in FLATTENED:
                row.update(_flatten(value, FLATTENED[f.name]))
            else:
                row[f.name] = _scalar(value)
        return row


#: RunRecord's dict fields and the prefix of the CSV columns each becomes (``cache.refresh_interval``)
FLATTENED = {"cache_params": "cache", "decoding_params": "decoding", "other_metrics": "metrics"}


def _flatten(params: dict, prefix: str) -> dict:
    out = {}
    for key in sorted(params, key=str):
        value = params[key]
        name = f"{prefix}.{key}"
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: _scalar(value)})
    return out


def _scalar(value):
    """A JSON-friendly CSV cell: numpy ints/floats become Python numbers, NaN/inf None (the
    JSON and CSV readers disagree on them), lists JSON text, paths and other objects str."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def settings_key(settings: dict) -> str:
    """Hash of a run's settings: a nested dict of plain values (canonical JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_key(row: dict) -> str:
    """The resume key of a row: its ``run_key``; for rows written before that column existed, a
    hash of ``LEGACY_KEY_FIELDS`` + the cache.* / decoding.* columns (never equal to a run_key).

    Values are compared as their CSV text and empty cells are dropped, so a freshly built
    ``to_row()`` and the same row read back from the CSV give the same key.
    """
    if row.get("run_key"):
        return str(row["run_key"])
    settings = {
        k: str(v) for k, v in row.items()
        if (k in LEGACY_KEY_FIELDS or k.startswith(LEGACY_KEY_PREFIXES)) and v is not None and v != ""
    }
    return "legacy-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
