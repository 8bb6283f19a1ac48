"""Sharded checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own
shards, and a checkpoint loads on any number of ranks (DCP reshards by global offsets),
or in one process into the plain, unwrapped model (a final export).

    save_sharded(directory, model, optimizer, extra={"step": 100})   # every rank
    extra = load_sharded(directory, model, optimizer)                # every rank, any world

The model and optimizer states go through `get_state_dict`/`set_state_dict`, so the
keys are the unwrapped model's parameter names whatever the wrapping (FSDP2, DDP or
none). `extra` is small JSON (the step, the sampler's and the schedule's state), written
by rank 0 next to the shards. Every rank must see the same directory (a shared file
system when ranks span nodes).

Atomic: the ranks write into `<directory>.tmp`; rank 0 renames it to `<directory>`
after every rank's shards and the metadata are written, so `<directory>` is a whole
checkpoint or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from autobatch.step.atomic import replace_directory

EXTRA_FILE = "extra.json"


def save_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes the model's (and the optimizer's) state as a DCP checkpoint; collective:
    every rank of the group calls it. Returns the checkpoint's directory."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    lead = _rank() == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
    _barrier()
    # dcp.save returns on rank 0 only after every rank reported its shards written.
    dcp.save(_state(model, optimizer), checkpoint_id=tmp)
    if lead:
        _write_json(tmp / EXTRA_FILE, extra or {})
        replace_directory(tmp, final)
    _barrier()  # nobody reads the checkpoint before it is in place
    return final


def load_sharded(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Loads a checkpoint of `save_sharded` into the model (and optimizer) as they are
    wrapped now, on any number of ranks or in one process; returns its `extra`.

    Give the optimizer built on the wrapped model's parameters; its state need not exist
    yet (`get_state_dict` creates it, so there is a slot for every saved tensor)."""
    path = Path(directory)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"directory={str(path)!r} is not a sharded checkpoint")
    state = _state(model, optimizer)  # the target's own shapes and shards, as DCP's template
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    return json.loads((path / EXTRA_FILE).read_text())


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
