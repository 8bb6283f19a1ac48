"""Sharded checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own
shards, and a checkpoint loads on any number of ranks (DCP reshards by global offsets),
or in one process into the plain, unwrapped model (a final export).

    save_sharded(directory, model, optimizer, extra={"step": 100})   # every rank
    pending = begin_save_sharded(directory, model, optimizer, extra=...)  # in the background
    extra = load_sharded(directory, model, optimizer)                # every rank, any world

The model and optimizer states go through `get_state_dict`/`set_state_dict`, so the
keys are the unwrapped model's parameter names whatever the wrapping (FSDP2, DDP or
none). `extra` is small JSON (the step, the sampler's and the schedule's state), written
by rank 0 next to the shards. Every rank must see the same directory (a shared file
system when ranks span nodes).

`directory` is a local path or an object store's URI (`s3://bucket/prefix/step_...`,
autobatch.step.storage; DCP's own fsspec storage writes and reads it there).

Complete only when whole: rank 0 writes a `COMMITTED` marker last, after every rank's
shards, DCP's `.metadata` and `extra.json` are written. Locally the ranks also write into
`<directory>.tmp`, which rank 0 renames to `<directory>` after the marker, so a local
`<directory>` is whole or absent (one written before the marker existed is whole too: it
was renamed into place; it has DCP's `.metadata`). An object store has no rename: the
shards go straight to `<directory>/`, and only the marker says they are all there
(`is_complete`).

In the background (`begin_save_sharded`): DCP's `async_save` copies each rank's shards to
host memory, then a thread writes them and runs DCP's collectives on a gloo group of its
own (the training loop's collectives go on meanwhile on the default group: one group for
both would interleave them). DCP's save returns on rank 0 only after every rank reported
its shards written and `.metadata` is written; only then does rank 0, in that thread, write
`extra.json` and the marker (and locally rename the directory into place). A rank killed
while the write is in flight leaves no marker: the checkpoint never counts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from autobatch.step import storage
from autobatch.step.atomic import replace_directory
from autobatch.step.background import PendingSave

EXTRA_FILE = "extra.json"
COMMIT_FILE = "COMMITTED"  # written last: the checkpoint is whole


def save_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> Path | str:
    """Writes the model's (and the optimizer's) state as a DCP checkpoint; collective:
    every rank of the group calls it. Returns the checkpoint's directory.
    `before_commit`: called on every rank once its shards are written, before the
    checkpoint is complete (a fault-injection seam)."""
    commit_hook = before_commit or (lambda: None)
    if storage.is_uri(directory):
        state = _state(model, optimizer)
        return _save_to_object_store(str(directory), state, extra or {}, commit_hook)
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    lead = _rank() == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
    _barrier()
    # dcp.save returns on rank 0 only after every rank reported its shards written.
    dcp.save(_state(model, optimizer), checkpoint_id=tmp)
    commit_hook()
    if lead:
        _write_json(tmp / EXTRA_FILE, extra or {})
        _write_json(tmp / COMMIT_FILE, {"complete": True})
        replace_directory(tmp, final)
    _barrier()  # nobody reads the checkpoint before it is in place
    return final


def _save_to_object_store(
    uri: str, state: dict[str, Any], extra: dict[str, Any], before_commit: Callable[[], None]
) -> str:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    uri = uri.rstrip("/")
    parent, name = uri.rsplit("/", 1)
    store = storage.Storage(parent)
    lead = _rank() == 0
    if lead:
        store.remove(f"{name}/{COMMIT_FILE}")  # a whole one of this step is whole no more
        store.remove(name)  # a crashed save's leftovers
    _barrier()
    writer = FsspecWriter(uri, sync_files=False, **store.options)  # a put is durable
    dcp.save(state, storage_writer=writer)  # returns on rank 0 after every rank's shards
    before_commit()
    if lead:
        store.write_bytes(f"{name}/{EXTRA_FILE}", json.dumps(extra).encode())
        store.write_bytes(f"{name}/{COMMIT_FILE}", b'{"complete": true}')
    _barrier()
    return uri


def begin_save_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> PendingSave:
    """`save_sharded` in the background; collective: every rank calls it at the same point.
    Returns once this rank's shards are copied to host memory; `wait()` on the result gives
    the checkpoint's directory once this rank's part is written (on rank 0: once the
    checkpoint is complete), or raises the write's error. `before_commit`: called in the
    writing thread once this rank's shards are written, before it reports them (a
    fault-injection seam: a rank killed there leaves the checkpoint incomplete)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    lead = _rank() == 0
    extra_json = json.dumps(extra or {})  # as it is now: the caller's dict may change
    hook = before_commit or (lambda: None)
    if storage.is_uri(directory):
        uri = str(directory).rstrip("/")
        parent, name = uri.rsplit("/", 1)
        store = storage.Storage(parent)
        if lead:
            store.remove(f"{name}/{COMMIT_FILE}")  # a whole one of this step is whole no more
            store.remove(name)  # a crashed save's leftovers
        _barrier()
        writer = _hooked(FsspecWriter, hook)(uri, sync_files=False, **store.options)

        def commit_object(_: Any) -> str:
            if lead:
                store.write_bytes(f"{name}/{EXTRA_FILE}", extra_json.encode())
                store.write_bytes(f"{name}/{COMMIT_FILE}", b'{"complete": true}')
            return uri

        commit: Callable[[Any], Any] = commit_object
    else:
        final = Path(directory)
        tmp = final.with_name(final.name + ".tmp")
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
        _barrier()
        writer = _hooked(FileSystemWriter, hook)(tmp)

        def commit_local(_: Any) -> Path:
            if lead:
                _write_json(tmp / EXTRA_FILE, json.loads(extra_json))
                _write_json(tmp / COMMIT_FILE, {"complete": True})
                replace_directory(tmp, final)
            return final

        commit = commit_local
    state = _state(model, optimizer)
    started = PendingSave.of(
        _future(dcp.async_save(state, storage_writer=writer, process_group=_background_group()))
    )
    return started.then(commit)


def _future(response: Any) -> Any:
    """The future of the write, whatever shape `async_save` answers in (torch 2.13: a
    Future, or an AsyncSaveResponse when the stager copies in the background)."""
    return getattr(response, "upload_completion", response)


def _hooked(writer_class: type, hook: Callable[[], None]) -> type:
    """`writer_class` calling `hook` once this rank's shards are written, before DCP hears."""

    class Hooked(writer_class):  # type: ignore[misc, valid-type]
        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)
            written.wait()
            hook()
            return written

    return Hooked


_GROUP: list[Any] = [None, None]  # [the default group it was made in, the gloo group]


def _background_group() -> Any:
    """A gloo group over the default group's ranks for the writing thread's collectives
    (made once per default group; collective, so made where every rank saves)."""
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _GROUP[0] is not world:
        _GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _GROUP[1]


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether the sharded checkpoint at `directory` is whole: its marker is there (a local
    directory also when it has DCP's metadata: renamed into place, before markers)."""
    if storage.is_uri(directory):
        return storage.Storage(directory).exists(COMMIT_FILE)
    path = Path(directory)
    return (path / COMMIT_FILE).is_file() or (path / ".metadata").is_file()


def load_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Loads a checkpoint of `save_sharded` into the model (and optimizer) as they are
    wrapped now, on any number of ranks or in one process; returns its `extra`.

    Give the optimizer built on the wrapped model's parameters; its state need not exist
    yet (`get_state_dict` creates it, so there is a slot for every saved tensor)."""
    state = _state(model, optimizer)  # the target's own shapes and shards, as DCP's template
    if storage.is_uri(directory):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        store = storage.Storage(directory)
        if not store.exists(COMMIT_FILE):
            raise FileNotFoundError(f"directory={directory!r} is not a complete sharded checkpoint")
        dcp.load(state, storage_reader=FsspecReader(str(directory), **store.options))
        extra = json.loads(store.read_bytes(EXTRA_FILE))
    else:
        path = Path(directory)
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"directory={str(path)!r} is not a sharded checkpoint")
        dcp.load(state, checkpoint_id=path)
        extra = json.loads((path / EXTRA_FILE).read_text())
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    return extra


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    if optimizer is None:
        return {"model": model_state}
    return {"model": model_state, "optimizer": optim_state}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
