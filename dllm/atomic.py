"""Whole-file writes: readers, and a crash mid-write, see the old file or the new one, never half of one;
and the output folder a script writes them into, checked before its work starts."""
from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

TMP_TOKEN_BYTES = 4  # random part of a temp file's name: ``.<name>.<8 hex digits>.tmp``


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # one call in practice; a regular file only takes less on a full disk
        view = view[os.write(fd, view):]
    os.fsync(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text is UTF-8) to a temp file beside ``path`` and swap it in with os.replace;
    only SIGKILL or power loss mid-write leaves a stray ``.<name>.*.tmp`` beside it; ValueError when
    ``path`` exists and is no regular file (replacing ``/dev/null`` as root would turn it into one). A new file gets
    0o666 & ~umask (not mkstemp's 0600), so a shared results file stays readable by the group; a
    replaced one keeps its mode (os.replace swaps in the temp file's inode, so the mode is copied)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # os.replace would put a file in place of a device, pipe or folder
        raise ValueError(f"{path} is not a regular file (a device, pipe or folder): give a file to write")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(TMP_TOKEN_BYTES)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            if path.exists():
                os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))
            write_all(fd, data.encode() if isinstance(data, str) else data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the old file stays, drop the partial copy
        tmp.unlink(missing_ok=True)
        raise


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its folders, upward, that exists but is not a folder: where a folder
    is needed at ``path``, none can be made; None when nothing is in the way."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def creation_refused(path: Path) -> tuple[Path, str] | None:
    """Where nothing can be made at or under ``path`` (its nearest existing folder, and the OS's
    reason), found by making and removing an empty folder there; None when that works.
    ``os.access`` answers yes to root on /proc and /sys, where no file can be made."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe."))
    except OSError as err:
        return existing, err.strerror or str(err)
    return None


def make_out_folder(name: str | os.PathLike, option: str = "--out", files: tuple[str, ...] = ()) -> Path:
    """Make the folder ``name`` (with its parents) unless it exists, and return it; ValueError (one
    line, naming ``option``) where it cannot be made or written to, or where one of the ``files`` the
    script writes there exists as something other than a regular file (a folder, a device), which
    :func:`write_atomic` would refuse. Scripts call it last among their checks (a refused command
    makes nothing) and before their work: found unusable after the work, the tables, figures or
    checkpoints would be lost."""
    if not str(name).strip():  # Path('') is the current folder
        raise ValueError(f"{option} {str(name)!r}: give a folder to write to")
    out = Path(name)
    if (blocking := file_in_the_way(out)) is not None:
        raise ValueError(f"{option} {out}: {blocking} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {out}: cannot make the folder ({err.strerror}); give a folder that exists or "
                         "can be made") from None
    if refused := creation_refused(out):
        raise ValueError(f"{option} {out}: the folder is not writable ({refused[1]})")
    for target in (out / file for file in files):
        if target.exists() and not target.is_file():
            raise ValueError(f"{option} {out}: {target.name} there is not a regular file (a folder, a device or a "
                             "pipe); remove it or give another folder")
    return out
