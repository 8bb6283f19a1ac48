"""Checkpoints of a job: one per step, named by it, the newest `keep` complete ones kept.

The job's wrapping (`autobatch.step.wrap.ModelWrapping`) writes and reads them, in
its own format: a replica's is one file (or object), `step_00000100.pt`, that rank 0
writes; a sharded model's is a directory (or prefix), `step_00000100/`, of
torch.distributed.checkpoint shards that every rank writes (loadable on any number of
ranks). The directory is a local path every node shares or an object store's URI
(`s3://bucket/prefix`, autobatch.step.storage).

A checkpoint counts only when complete: a replica's file when it exists (renamed into
place locally, put whole on an object store); a sharded one when its `COMMITTED` marker,
written last by rank 0, exists (locally also one renamed into place before markers
existed, `autobatch.step.dcp.is_complete`). Listing and resuming skip incomplete ones;
retention never deletes the newest complete one, and removes incomplete ones older than
it. This module names checkpoints, finds the latest, rotates old ones, and refuses to
resume a job from a checkpoint in another wrapping's format. `begin_checkpoint` saves in
the background (the state copied to host memory, then written by a thread; retention runs
once the write is complete); `save_checkpoint` waits for it. A save that fails for want
of storage (no space, no permission, a read-only or unreachable file system or store)
raises a StorageError naming the directory and what is missing, which the failure
policy does not retry.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist

from autobatch.errors import LaunchError, StorageError
from autobatch.step import storage
from autobatch.step.background import PendingSave
from autobatch.step.dcp import is_complete
from autobatch.step.wrap import ModelWrapping, read_replica

_NAME = re.compile(r"step_(\d{8})(\.pt)?")
_PARTIAL = re.compile(r"step_(\d{8})(\.tmp)?")  # a sharded save's leftovers may be either

Checkpoint = pathlib.Path | str  # a local path, or an object store's URI


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    wrapping: ModelWrapping,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
    before_commit: Callable[[], None] | None = None,
) -> Checkpoint:
    """The checkpoint of `step` (every rank calls it; `state` is the rest of the training
    state, small JSON); rank 0 then removes all but the newest `keep` complete ones."""
    return begin_checkpoint(
        directory, step, wrapping, model, optimizer, state,
        keep=keep, before_commit=before_commit, background=False,
    ).wait()  # fmt: skip


def begin_checkpoint(
    directory: str | os.PathLike,
    step: int,
    wrapping: ModelWrapping,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
    before_commit: Callable[[], None] | None = None,
    background: bool = True,
) -> PendingSave:
    """The checkpoint of `step`, as `save_checkpoint`; `background`: returns once the state
    is copied to host memory and writes it in a thread (`wrapping.begin_save`). The result's
    `wait()` gives the checkpoint once complete, after rank 0's retention, or raises the
    StorageError (or other error) of the write; call it before the next save."""
    store = storage.Storage(directory)
    final = store.join(f"step_{step:08d}{wrapping.checkpoint_suffix}")

    def fault(exc: BaseException) -> StorageError | None:
        found = store.fault(exc)
        if found is None:
            return None
        return StorageError(f"checkpoint of step {step}: {found}", found.path)

    try:
        if store.local:
            pathlib.Path(store.root).mkdir(parents=True, exist_ok=True)
        begin = getattr(wrapping, "begin_save", None) if background else None
        if begin is not None:
            pending = begin(final, model, optimizer, state, before_commit=before_commit)
        else:  # synchronous (or a wrapping that only saves in the foreground)
            path = wrapping.save(final, model, optimizer, state, before_commit=before_commit)
            pending = PendingSave.finished(path)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        found = fault(exc)
        if found is None:
            raise
        raise found from exc
    lead = not dist.is_initialized() or dist.get_rank() == 0

    def retention(path: Checkpoint) -> Checkpoint:
        if lead:
            _rotate(store, keep)
        return path

    return pending.then(retention, fault=fault)


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
    if storage.is_uri(path):
        return "none" if str(path).endswith(".pt") else "sharded"
    return "sharded" if pathlib.Path(path).is_dir() else "none"


def _rotate(store: storage.Storage, keep: int) -> None:
    """All but the newest `keep` complete checkpoints removed, and the incomplete ones older
    than the newest complete one (a crashed save's leftovers)."""
    complete = _complete(store)
    if not complete:
        return
    newest = _step_of(complete[-1])
    for name in complete[:-keep]:
        store.remove(name)
    for name in store.names():
        m = _PARTIAL.fullmatch(name)
        if m and name not in complete and int(m.group(1)) < newest:
            store.remove(name)


def _complete(store: storage.Storage) -> list[str]:
    """The names of the complete checkpoints in `store`, oldest first."""
    found = []
    for name in store.names():
        if not _NAME.fullmatch(name):
            continue
        if name.endswith(".pt") or is_complete(store.join(name)):
            found.append(name)
    return sorted(found)


def _step_of(name: str) -> int:
    m = _NAME.fullmatch(name)
    assert m is not None
    return int(m.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints in `directory` (a local path: Paths; a URI: URIs), oldest first."""
    store = storage.Storage(directory)
    return [store.join(name) for name in _complete(store)]


def latest_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_name(path: str | os.PathLike) -> str:
    """A checkpoint's name (`step_00000100.pt`), whether a local path or a URI."""
    return storage.basename(path)


def checkpoint_step(path: str | os.PathLike | None) -> int:
    """The step a checkpoint was taken at (0 for none)."""
    if path is None:
        return 0
    m = _NAME.fullmatch(storage.basename(path))
    if m is None:
        raise ValueError(f"{path} is not a checkpoint (step_NNNNNNNN[.pt])")
    return int(m.group(1))
