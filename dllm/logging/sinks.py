"""Where run records go: the shared results CSV, the run directory and W&B.

All three are fed the same ``RunRecord.to_row()``, so they carry the same numbers.
"""
from __future__ import annotations

import csv
import io
import json
import os
import secrets
from pathlib import Path

from filelock import FileLock

from .record import RunRecord, record_key

WANDB_MODES = ("online", "offline", "disabled")


def _csv_text(header: list[str], rows: list[dict], with_header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)  # missing cells are written empty
    return buf.getvalue()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # one call in practice; a regular file only takes less on a full disk
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _replace_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a mix; only SIGKILL or power loss mid-write leaves a stray
    ``.<name>.*.tmp`` beside it. Created with 0o666 & ~umask (not mkstemp's 0600), so a shared
    results file stays readable by the group."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            _write_all(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the old file stays, drop the partial copy
        tmp.unlink(missing_ok=True)
        raise


def _read_text(path: Path) -> str:
    with open(path, newline="", encoding="utf-8") as f:  # newline="": keep the bytes as they are
        return f.read()


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def append_csv(path: str | os.PathLike, row: dict) -> None:
    """Append one row under ``<path>.lock`` (safe for concurrent SLURM jobs).

    A new or empty file gets the header first. A row with columns the file lacks (say a cache
    param no earlier run had) rewrites the file with the union of columns, the new ones last,
    old rows blank there. Every change is a whole new file written in one write + fsync and
    swapped in by ``os.replace``: an O_APPEND write is not enough, since the kernel may cut a
    write to a regular file short when SIGKILL arrives mid-copy, leaving half a row. The old
    rows are copied byte for byte, so appending costs one read and one write of the file.
    """
    path = Path(path).resolve()  # through a symlink, so os.replace swaps the target, not the link
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        old = _read_text(path) if path.exists() else ""
        header = next(csv.reader(io.StringIO(old, newline="")), [])
        if not header:
            text = _csv_text(list(row), [row], with_header=True)
        elif new_columns := [c for c in row if c not in header]:
            text = _csv_text(header + new_columns, [*_rows(old), row], with_header=True)
        else:
            # A hand-edited file may lack its final newline; without one the row would merge.
            text = old + ("" if old.endswith("\n") else "\n") + _csv_text(header, [row], with_header=False)
        _replace_atomic(path, text)


def existing_keys(path: str | os.PathLike) -> set[str]:
    """``record_key`` of every row with status "ok" (a sweep skips these on resume)."""
    path = Path(path).resolve()
    if not path.exists():
        return set()
    # No lock needed: writers swap whole files in, so a read always sees a complete one.
    return {record_key(r) for r in _rows(_read_text(path)) if r.get("status") == "ok"}


def write_run_dir(run_dir: str | os.PathLike, record: RunRecord, samples: list[dict], config_yaml: str) -> None:
    """``metrics.json`` (the row), ``samples.jsonl`` (one object per sample), ``config.yaml``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _replace_atomic(run_dir / "metrics.json", json.dumps(record.to_row(), indent=2) + "\n")
    lines = "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples)
    _replace_atomic(run_dir / "samples.jsonl", lines)
    _replace_atomic(run_dir / "config.yaml", config_yaml)


class WandbSink:
    """One W&B run per record: config, the row as summary, the samples as a table.

    ``mode`` falls back to ``$WANDB_MODE``, then to "offline": a cluster job without network
    or API key still logs (``wandb sync`` uploads later) instead of failing at the end of a run.
    """

    def __init__(
        self,
        project: str,
        mode: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if self.mode not in WANDB_MODES:
            raise ValueError(f"wandb mode={self.mode!r} (allowed: {', '.join(WANDB_MODES)})")
        self.project, self.entity, self.group, self.tags = project, entity, group, tags
        self.run_dir = run_dir

    def log(self, record: RunRecord, samples: list[dict], config: dict) -> Path | None:
        """Log one run; return its local folder (``<run_dir>/wandb/<offline-run-...>``), None
        when disabled. ``run_dir`` defaults to ``record.run_dir``, then the working directory."""
        import wandb  # ~1 s import: only paid by runs that log to W&B

        run_dir = Path(self.run_dir or record.run_dir or ".")
        run_dir.mkdir(parents=True, exist_ok=True)
        row = record.to_row()
        try:
            with wandb.init(
                project=self.project, entity=self.entity, group=self.group, tags=self.tags,
                name=record.run_id, dir=str(run_dir), config=config, mode=self.mode,
            ) as run:
                run.summary.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
                if samples:
                    run.log({"samples": _table(samples)})
                folder = None if self.mode == "disabled" else Path(run.dir).parent
        finally:
            # wandb 0.31 writes the offline transaction log (run-*.wandb) when its service shuts
            # down, not at finish(); tearing it down here puts the whole run on disk before we
            # return instead of leaving it to an atexit hook.
            wandb.teardown()
        return folder


def _table(samples: list[dict]):
    import wandb

    columns = list(dict.fromkeys(k for s in samples for k in s))  # union, first-seen order
    data = [[s.get(c) for c in columns] for s in samples]
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)
