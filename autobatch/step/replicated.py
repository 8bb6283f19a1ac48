"""The replica wrapping and its checkpoint file: a full replica per rank (torch DDP when a
process group of more than one rank is up), its whole training state in one torch file
(locally renamed into place) or one object (one put). `Proportional` checkpoints in the
same format. The wrapping's contract is `autobatch.step.wrap.ModelWrapping`."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.step import storage
from autobatch.step.atomic import write_atomically
from autobatch.step.background import PendingSave, to_host


class Replicated:
    """A full replica per rank: DDP over the default process group when it has more than
    one rank, else the plain module.

    The forward must run inside `no_sync` too: a forward outside it arms DDP's
    all-reduce, and ranks with different micro-step counts would then issue different
    numbers of collectives and hang.

    A checkpoint is one torch file written atomically by rank 0 (every rank holds the
    same replica): the `extra` training state, plus "model" and "optimizer" state dicts.
    """

    sharding = "none"
    retries_oom_in_place = True  # no_sync micro-steps issue no collective
    checkpoint_suffix = ".pt"

    def __repr__(self) -> str:
        return "Replicated()"

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return model
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def micro_step(self, wrapped: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        if last or not isinstance(wrapped, DDP):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def world_size(self, wrapped: nn.Module) -> int:
        return dist.get_world_size() if isinstance(wrapped, DDP) else 1

    def check_plan(self, micro_steps_per_rank: Sequence[int]) -> None:
        """Any counts: `no_sync` keeps every micro-step but the last one local."""

    def save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> Path | str:
        """Rank 0 writes the file (on an object store: one object, put whole); the other
        ranks return its path at once."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            state = _replica_state(model, optimizer, extra)
            if before_commit is not None:
                before_commit()
            write_replica(path, state)
        return storage.location(path)

    def begin_save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> PendingSave:
        """Rank 0 copies the state to host memory and a thread writes the file (the other
        ranks return its path at once). `before_commit`: called in that thread once the
        file's bytes are written, before it is renamed into place (or put)."""
        where = storage.location(path)
        if dist.is_initialized() and dist.get_rank() != 0:
            return PendingSave.finished(where)
        state = to_host(_replica_state(model, optimizer, extra))
        return PendingSave.start(lambda: write_replica(path, state, before_commit) or where)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        state = read_replica(path)
        replica_module(model).load_state_dict(state.pop("model"))
        saved_optimizer = state.pop("optimizer", None)
        if optimizer is not None and saved_optimizer is not None:
            optimizer.load_state_dict(saved_optimizer)
        return state

    def holds_checkpoint(self, path: str | os.PathLike) -> bool:
        if storage.is_uri(path):
            return str(path).endswith(".pt")  # one object, not a prefix of shards
        return Path(path).is_file()

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return replica_module(model).state_dict()

    def plain_model(
        self,
        model: nn.Module,
        full_state: dict[str, torch.Tensor],
        build: Callable[[], nn.Module],
    ) -> nn.Module:
        return replica_module(model)


REPLICATED = Replicated()


def _replica_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any]
) -> dict[str, Any]:
    state = {**extra, "model": replica_module(model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def write_replica(
    path: str | os.PathLike, state: dict[str, Any], written: Callable[[], None] | None = None
) -> None:
    """One torch file, whole: on an object store one put, locally renamed into place;
    `written()` called once its bytes are written, before that."""
    mid = written or (lambda: None)
    if storage.is_uri(path):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        mid()
        parent, name = str(path).rsplit("/", 1)
        storage.Storage(parent).write_bytes(name, buffer.getvalue())
    else:
        write_atomically(path, lambda f: (torch.save(state, f), mid()))


def read_replica(path: str | os.PathLike) -> dict[str, Any]:
    """The whole state of a replica's checkpoint file (or object), on the CPU."""
    if storage.is_uri(path):
        parent, name = str(path).rsplit("/", 1)
        path = io.BytesIO(storage.Storage(parent).read_bytes(name))
    return torch.load(path, map_location="cpu", weights_only=True)


def replica_module(model: nn.Module) -> nn.Module:
    """DDP's module, else the model itself."""
    return model.module if isinstance(model, DDP) else model
