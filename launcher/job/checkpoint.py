"""Atomic checkpoints: model, optimizer, schedule, sampler state and plan, one per step.

A replica's checkpoint is one file, `step_00000100.pt`, written by rank 0 to a
temporary file in the same directory, fsynced and renamed over its final name, then
the directory is fsynced. A sharded model's is a directory, `step_00000100/`, of
torch.distributed.checkpoint shards that every rank writes (`autobatch.step.dcp`:
atomic too, and loadable on any number of ranks). Either way a reader sees a whole
checkpoint or none. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Literal

import torch
from torch import nn

_NAME = re.compile(r"step_(\d{8})(\.pt)?")


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
    _rotate(d, keep)
    return final


def save_sharded_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> pathlib.Path:
    """A sharded model's checkpoint (collective: every rank calls it); `state` is the rest
    of the training state, small JSON."""
    import torch.distributed as dist

    from autobatch.step.dcp import save_sharded

    final = save_sharded(
        pathlib.Path(directory) / f"step_{step:08d}", model, optimizer, extra=state
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        _rotate(pathlib.Path(directory), keep)
    return final


def checkpoint_sharding(path: str | os.PathLike) -> Literal["none", "sharded"]:
    """How the checkpoint at `path` holds the model: a replica's file, or shards."""
    return "sharded" if pathlib.Path(path).is_dir() else "none"


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict under the plain module's names; for a sharded model a
    collective (every rank calls it) that gives the whole state on rank 0 only."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


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


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
