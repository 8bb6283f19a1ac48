"""Checkpoints of a job: one per step, named by it, the newest `keep` kept.

The job's wrapping (`autobatch.step.wrap.ModelWrapping`) writes and reads them, in
its own format, atomically: a replica's is one file, `step_00000100.pt`, that rank 0
writes; a sharded model's is a directory, `step_00000100/`, of
torch.distributed.checkpoint shards that every rank writes (loadable on any number of
ranks). Either way a reader sees a whole checkpoint or none. This module names them,
finds the latest, rotates old ones, and refuses to resume a job from a checkpoint in
another wrapping's format. A save that fails for want of storage (no space, no
permission, a read-only or unreachable file system) raises a StorageError naming the
directory and what is missing, which the failure policy does not retry.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import Any, Literal

import torch
import torch.distributed as dist

from autobatch.errors import LaunchError, StorageError
from autobatch.step.atomic import storage_error
from autobatch.step.wrap import ModelWrapping, read_replica

_NAME = re.compile(r"step_(\d{8})(\.pt)?")


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    wrapping: ModelWrapping,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> pathlib.Path:
    """The checkpoint of `step` (every rank calls it; `state` is the rest of the training
    state, small JSON); rank 0 then removes all but the newest `keep`."""
    d = pathlib.Path(directory)
    final = d / f"step_{step:08d}{wrapping.checkpoint_suffix}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        path = wrapping.save(final, model, optimizer, state)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        fault = storage_error(d, exc)
        if fault is None:
            raise
        raise StorageError(f"checkpoint of step {step}: {fault}", fault.path) from exc
    if not dist.is_initialized() or dist.get_rank() == 0:
        _rotate(d, keep)
    return path


def restore_checkpoint(
    path: str | os.PathLike,
    wrapping: ModelWrapping,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """The checkpoint at `path` into the model and optimizer (every rank calls it, whatever
    the world size that saved it); returns the rest of its training state."""
    if not wrapping.holds_checkpoint(path):
        held = "replica" if checkpoint_sharding(path) == "none" else "sharded model"
        raise LaunchError(
            f"checkpoint {path} holds a {held}; this job runs sharding {wrapping.sharding}: "
            "resume with the sharding that saved it, or start from no checkpoint"
        )
    return wrapping.load(path, model, optimizer)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A replica's checkpoint as saved (model, optimizer and training state), for tools."""
    return read_replica(path)


def checkpoint_sharding(path: str | os.PathLike) -> Literal["none", "sharded"]:
    """How the checkpoint at `path` holds the model: a replica's file, or shards."""
    return "sharded" if pathlib.Path(path).is_dir() else "none"


def _rotate(d: pathlib.Path, keep: int) -> None:
    for old in list_checkpoints(d)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def list_checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoints in `directory`, oldest first."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.fullmatch(p.name))


def latest_checkpoint(directory: str | os.PathLike) -> pathlib.Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike | None) -> int:
    """The step a checkpoint was taken at (0 for none)."""
    if path is None:
        return 0
    m = _NAME.fullmatch(pathlib.Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint (step_NNNNNNNN[.pt])")
    return int(m.group(1))
