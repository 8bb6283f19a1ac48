"""Atomic writes: a reader sees the whole file or directory, or none of it; a write that
fails for want of storage says so.

    write_atomically(path, write)  a file: written to a temporary beside it, fsynced,
                                   renamed over `path`, the directory fsynced
    replace_directory(tmp, final)  a directory whose files are written: renamed over
                                   `final` (an older one moved aside, then removed)
    storage_error(directory, exc)  the StorageError behind a failed write, or None

The checkpoints of both wrappings use them (`Replicated`: one torch file;
`autobatch.step.dcp`: a directory of shards).

A full disk does not always raise an OSError: torch.save's zip writer turns ENOSPC into
`RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`, with the
OSError only in its `__context__` (and DCP wraps each rank's error in a
CheckpointException). `storage_error` looks for the errno along the exception's chain,
and failing that asks the file system (read-only, not writable, nearly full).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from autobatch.errors import StorageError

# What each storage errno means is missing, as a message names it.
STORAGE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on {path}",
    errno.EDQUOT: "no space left on {path} (its disk quota is used up)",
    errno.EACCES: "no permission to write to {path}",
    errno.EPERM: "no permission to write to {path}",
    errno.EROFS: "no write access to {path}: its file system is read-only",
    errno.EIO: "{path} is unreachable (input/output error)",
    errno.ENOTCONN: "{path} is unreachable (its file system is not connected)",
    errno.ESTALE: "{path} is unreachable (a stale network file handle)",
    errno.EHOSTDOWN: "{path} is unreachable (its host is down)",
    errno.EHOSTUNREACH: "{path} is unreachable (no route to its host)",
    errno.ETIMEDOUT: "{path} is unreachable (timed out)",
}
NEARLY_FULL_BYTES = 1 << 20  # less free than this, and a write that failed failed for space


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls `write(f)` on a temporary file in `path`'s directory, then renames it to `path`."""
    final = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=final.suffix)
    except OSError as exc:
        fault = storage_error(final.parent, exc)
        if fault is None:
            raise
        raise fault from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        fault = storage_error(final.parent, exc)  # asked before the temporary frees its space
        Path(tmp).unlink(missing_ok=True)
        if fault is not None:
            raise fault from exc
        raise
    fsync_directory(final.parent)
    return final


def replace_directory(tmp: Path, final: Path) -> None:
    """Renames `tmp` to `final`; an older `final` is moved aside first and then removed."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_directory(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_directory(path: Path) -> None:
    """Makes a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(directory: str | os.PathLike, exc: BaseException) -> StorageError | None:
    """The storage fault behind `exc`, raised writing into `directory`: the errno found on its
    chain (causes, contexts, a CheckpointException's ranks), else what the file system says;
    None when `exc` is no storage fault (or is an interrupt)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    code = _errno_on_chain(exc)
    if code is None:
        code = _file_system_fault(Path(directory))
    if code not in STORAGE_ERRNOS:
        return None
    return StorageError(STORAGE_ERRNOS[code].format(path=directory), str(directory))


def storage_errno(exc: BaseException | None) -> int | None:
    """The errno of `exc` when it is an OSError that means storage is missing."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.errno
    return None


def _errno_on_chain(exc: BaseException) -> int | None:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        code = storage_errno(e)
        if code is not None:
            return code
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        # torch.distributed.checkpoint's CheckpointException: {rank: (exception, trace)}
        for failure in (getattr(e, "failures", None) or {}).values():
            first = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(first, BaseException):
                todo.append(first)
    return None


def _file_system_fault(directory: Path) -> int | None:
    """An errno for what is wrong with the file system `directory` is on, or None."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is None:
        return None
    try:
        fs = os.statvfs(existing)
    except OSError as exc:
        return exc.errno if exc.errno in STORAGE_ERRNOS else None
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if not os.access(existing, os.W_OK):
        return errno.EACCES
    if fs.f_bavail * fs.f_frsize < NEARLY_FULL_BYTES:
        return errno.ENOSPC
    return None
