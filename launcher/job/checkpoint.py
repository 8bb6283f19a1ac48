"""Atomic checkpoints: model, optimizer, schedule, sampler state and plan, one file per step.

A checkpoint is written to a temporary file in the same directory, fsynced and
renamed over its final name, then the directory is fsynced: a reader sees a
whole checkpoint or none. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
from typing import Any

import torch

_NAME = re.compile(r"step_(\d{8})\.pt")


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 2
) -> pathlib.Path:
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoints in `directory`, oldest first."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.fullmatch(p.name))


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
