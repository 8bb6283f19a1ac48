"""Atomic writes: a reader sees the whole file or directory, or none of it.

    write_atomically(path, write)  a file: written to a temporary beside it, fsynced,
                                   renamed over `path`, the directory fsynced
    replace_directory(tmp, final)  a directory whose files are written: renamed over
                                   `final` (an older one moved aside, then removed)

The checkpoints of both wrappings use them (`Replicated`: one torch file;
`autobatch.step.dcp`: a directory of shards).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls `write(f)` on a temporary file in `path`'s directory, then renames it to `path`."""
    final = Path(path)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=final.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
