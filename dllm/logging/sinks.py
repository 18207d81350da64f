"""Where run records go: the shared results CSV, the run directory and W&B.

All three are fed the same ``RunRecord.to_row()``, so they carry the same numbers.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from filelock import FileLock

from dllm.atomic import TMP_TOKEN_BYTES, creation_refused, write_all, write_atomic

from .record import RunRecord, record_key

WANDB_MODES = ("online", "offline", "disabled")
# Columns every row of ``RunRecord.to_row()`` has: a header without them is another tool's file.
REQUIRED_COLUMNS = ("run_id", "model", "cache", "decoding", "task", "status")
# Bytes that are not UTF-8, as decoded with errors="surrogateescape".
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class ResultsCsvError(ValueError):
    """The results CSV cannot be appended to safely; the message is one line: file, problem, fix."""


def _csv_text(header: list[str], rows: list[dict], with_header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)  # missing cells are written empty
    return buf.getvalue()


def _remove_dead_temps(path: Path) -> None:
    """Call under ``<path>.lock``: only the lock holder writes ``path``'s temp files, so any that
    exists now was left by a writer killed mid-write."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * TMP_TOKEN_BYTES}}}\.tmp")
    for entry in path.parent.iterdir():
        if pattern.fullmatch(entry.name):
            entry.unlink(missing_ok=True)


def _read_text(path: Path) -> str:
    with open(path, newline="", encoding="utf-8") as f:  # newline="": keep the bytes as they are
        return f.read()


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


class _Scan(NamedTuple):
    header: list[str]
    rows: int  # complete data rows after the header
    end: int  # characters of the text that the header and those rows span
    end_line: int  # lines they span
    problem: str | None  # why the rest of the text cannot be read; None: all of it can


def _scan(text: str) -> _Scan:
    """Parse ``text`` as ``append_csv`` writes it and find where it stops being readable.

    ``strict=True``: without it the csv module silently closes a quoted field left open at the
    end of the file, and the next appended row would vanish into that field. Rows must have as
    many cells as the header (blank lines are skipped, as by every CSV reader).
    """
    consumed = 0

    def lines():  # the reader pulls one line at a time and never reads past the row it returns
        nonlocal consumed
        for line in io.StringIO(text, newline=""):
            consumed += len(line)
            yield line

    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    rows = end = end_line = 0

    def stop(problem: str | None) -> _Scan:
        return _Scan(header or [], rows, end, end_line, problem)

    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return stop(None)
        except csv.Error as e:
            cut = str(e) == "unexpected end of data"
            return stop("a quoted field is never closed (the file was cut short?)" if cut else f"csv error: {e}")
        if _UNDECODABLE.search(text, end, consumed):
            return stop("bytes that are not UTF-8")
        if header is None:
            header = cells
        elif cells and len(cells) != len(header):
            return stop(f"a row of {len(cells)} cells under a header of {len(header)}")
        else:
            rows += bool(cells)
        end, end_line = consumed, reader.line_num


def csv_layout(path: Path) -> tuple[list[str], str | None]:
    """The header of the CSV file ``path`` and where it stops being readable as :func:`append_csv`
    writes it ("line N: the problem"), or None there: pandas would drop or misread a row cut short
    there, as a crash can leave."""
    scan = _scan(path.read_bytes().decode("utf-8", "surrogateescape"))
    return scan.header, (f"line {scan.end_line + 1}: {scan.problem}" if scan.problem else None)


def _check_writable(path: Path) -> None:
    """``path`` is about to be replaced by a new file in its folder (and a lock file made there)."""
    folder = path.parent
    if path.exists() and not path.is_file():  # a device or a pipe would be read forever, then replaced
        kind = "a folder" if path.is_dir() else "not a regular file (a device, a pipe or a socket)"
        raise ResultsCsvError(f"{path}: {kind}. Fix: set results_csv to a CSV file")
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        # root may write anything: the owner's write bit is what says "do not replace"
        if not os.access(path, os.W_OK) or not mode & stat.S_IWUSR:
            raise ResultsCsvError(
                f"{path}: write-protected (mode {mode:#o}), so it is never replaced. "
                f"Fix: chmod u+w {path}, or set results_csv to another file"
            )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ResultsCsvError(f"{path}: its folder is not writable. Fix: set results_csv to a file in a writable folder")


def _check_header(path: Path, text: str, header: list[str]) -> None:
    if missing := [c for c in REQUIRED_COLUMNS if c not in header]:
        first_line = text.splitlines()[0] if text else ""
        raise ResultsCsvError(
            f"{path}: not a results CSV of this project (its first line {first_line[:60]!r} lacks the columns "
            f"{', '.join(missing)}; another tool's file, or another separator than ','). "
            f"Fix: set results_csv to another file, or move this one away"
        )


def _check_header_only(path: Path) -> None:
    """``_check_writable`` and ``_check_header`` on the file's first row, read without the lock."""
    _check_writable(path)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as file:
        first = file.readline()
    if first.strip():
        _check_header(path, first, next(csv.reader([first]), []))


def _checked_text(path: Path) -> str:
    """The text of ``path`` ("" when absent or blank) after checking that rows can be appended to it."""
    _check_writable(path)
    if not path.exists():
        return ""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as e:
        raise ResultsCsvError(f"{path}: cannot be read ({e.strerror}). Fix: set results_csv to a readable file") from e
    if not text.strip():
        return ""
    scan = _scan(text)
    _check_header(path, text, scan.header)
    if scan.problem:
        raise ResultsCsvError(
            f"{path}: unreadable from line {scan.end_line + 1} on: {scan.problem}; readers (pandas, resume) "
            f"fail there, so nothing is appended. Fix: python scripts/repair_csv.py {path} (keeps the header and the rows before line "
            f"{scan.end_line + 1}, moves the rest to {path}.rejected)"
        )
    return text


def check_results_csv(path: str | os.PathLike) -> None:
    """Raise ``ResultsCsvError`` (one line: file, problem, fix) unless rows can be appended to
    ``path``: absent or empty, or a readable CSV with this project's header, and writable.
    A missing folder must be one that can be made (``append_csv`` makes it: a run refused later leaves
    nothing behind). Call it before a run loads anything; ``append_csv`` checks again."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():  # null, a number, '' (the current folder)
        raise ResultsCsvError(f"results_csv={path!r}: give the CSV file to append the run's row to "
                              "(e.g. results_csv=results/runs.csv)")
    path = Path(path).resolve()
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        raise ResultsCsvError(f"{path}: cannot create its folder ({existing} is a file). Fix: set results_csv to "
                              "another file")
    if refused := creation_refused(path.parent):
        raise ResultsCsvError(f"{path}: cannot create {'a file' if refused[0] == path.parent else 'its folder'} in "
                              f"{refused[0]} ({refused[1]}). Fix: set results_csv to a file in a writable folder")
    if existing == path.parent:
        _checked_text(path)
    lock = Path(f"{path}.lock")
    if lock.exists() and not lock.is_file():  # FileLock opens it as a file
        raise ResultsCsvError(f"{lock}: the lock file of results_csv is not a file. Fix: remove it, or set "
                              "results_csv to another file")


def repair_results_csv(path: str | os.PathLike) -> tuple[int, int]:
    """Move the unreadable tail of a results CSV (from the first row that cannot be read on) byte
    for byte to ``<path>.rejected`` (appended to it if it exists) and keep the header and the rows
    before it. Returns (rows kept, bytes moved); (rows, 0) when every row is readable. Refuses
    (``ResultsCsvError``) a file that is not this project's or is write-protected, moving nothing."""
    path = Path(path).resolve()
    _check_header_only(path)  # another tool's file is refused before a lock file is made beside it
    with FileLock(f"{path}.lock"):  # an append must neither race the rewrite nor delete its temp file
        _check_writable(path)
        data = path.read_bytes()
        text = data.decode("utf-8", "surrogateescape")  # every byte survives into the .rejected file
        if not text.strip():
            return 0, 0
        scan = _scan(text)
        _check_header(path, text, scan.header)
        if scan.problem is None:
            return scan.rows, 0
        good = text[: scan.end]
        tail = data[len(good.encode()) :]  # the readable part is valid UTF-8: its length in bytes is exact
        # The tail is saved (fsynced) before the file is cut: a crash in between duplicates it, loses nothing.
        fd = os.open(f"{path}.rejected", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            write_all(fd, tail)
        finally:
            os.close(fd)
        write_atomic(path, good)
        return scan.rows, len(tail)


def append_csv(path: str | os.PathLike, row: dict) -> None:
    """Append one row under ``<path>.lock`` (safe for concurrent SLURM jobs).

    A new or empty file gets the header first. A row with columns the file lacks (say a cache
    param no earlier run had) rewrites the file with the union of columns, the new ones last,
    old rows blank there. Every change is a whole new file written in one write + fsync and
    swapped in by ``os.replace``: an O_APPEND write is not enough, since the kernel may cut a
    write to a regular file short when SIGKILL arrives mid-copy, leaving half a row. The old
    rows are copied byte for byte, so appending costs one read and one write of the file; the
    file keeps its mode.

    Under the lock, temp files of killed writers are removed and the file is checked as by
    ``check_results_csv`` (it may have changed since the run's own check): a file that is not
    readable to its end, another tool's, or write-protected raises ``ResultsCsvError`` and stays
    as it is.
    """
    path = Path(path).resolve()  # through a symlink, so os.replace swaps the target, not the link
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        _remove_dead_temps(path)
        old = _checked_text(path)
        header = next(csv.reader(io.StringIO(old, newline="")), [])
        if not header:
            text = _csv_text(list(row), [row], with_header=True)
        elif new_columns := [c for c in row if c not in header]:
            text = _csv_text(header + new_columns, [*_rows(old), row], with_header=True)
        else:
            # A hand-edited file may lack its final newline; without one the row would merge.
            text = old + ("" if old.endswith("\n") else "\n") + _csv_text(header, [row], with_header=False)
        write_atomic(path, text)


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
    write_atomic(run_dir / "metrics.json", json.dumps(record.to_row(), indent=2) + "\n")
    lines = "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples)
    write_atomic(run_dir / "samples.jsonl", lines)
    write_atomic(run_dir / "config.yaml", config_yaml)


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
