"""How a rank's model is wrapped for data parallelism: the seam of every memory lever.

A wrapping says how each micro-step synchronises (the accumulator asks it for the
context of each micro-step and for the world its gradients are averaged over), and
owns everything that depends on how the ranks hold the model: which plans can run,
whether an out-of-memory can be retried in place, the checkpoint's format (save,
load), and the whole model (its full state, the plain module for export). Two
wrappings implement it: `Replicated`, a full replica per rank (torch DDP when a
process group of more than one rank is up), and `Sharded` (autobatch.step.shard:
FSDP2, "optimizer" or "full" sharding) and `Proportional` (autobatch.step.proportional:
planned slices of the flat state, checkpoints in the replica's format).
`wrapping_for(sharding)` names one.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.levers import check_sharding
from autobatch.step import storage
from autobatch.step.atomic import write_atomically
from autobatch.step.background import PendingSave, to_host
from autobatch.step.shard import Sharded


class ModelWrapping(Protocol):
    """The accumulator calls `micro_step` and `world_size`; a launcher calls the rest."""

    sharding: str  # the lever's name (autobatch.levers): "none", "optimizer", "full"
    retries_oom_in_place: bool  # ranks can agree to drop a step after a no_sync OOM
    checkpoint_suffix: str  # of a checkpoint's name: ".pt" (one file) or "" (a directory)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as the rank trains it."""
        ...

    def micro_step(self, wrapped: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-step's forward AND backward: gradients are synchronised
        in the last one only."""
        ...

    def world_size(self, wrapped: nn.Module) -> int:
        """How many ranks the synchronised gradients are averaged over."""
        ...

    def check_plan(self, micro_steps_per_rank: Sequence[int]) -> None:
        """Raise PlanError when the ranks' micro-step counts cannot run under this wrapping."""
        ...

    def save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> Path | str:
        """Every rank calls it: the model's and optimizer's state and `extra` (the rest of
        the training state) as one checkpoint at `path` (a local path, or an object store's
        URI: then a str), complete only when whole. `before_commit`: called in the middle,
        before the checkpoint is complete (a fault-injection seam)."""
        ...

    def begin_save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> PendingSave:
        """`save` in the background: returns once the state is copied to host memory; the
        result's `wait()` gives the checkpoint once complete (or raises the write's error).
        `before_commit`: called in the middle of the background write."""
        ...

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Every rank calls it: the checkpoint at `path` into the model and optimizer;
        returns its `extra`."""
        ...

    def holds_checkpoint(self, path: str | os.PathLike) -> bool:
        """Whether the checkpoint at `path` is in this wrapping's format."""
        ...

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every rank calls it: the whole state dict under the plain module's names (on rank
        0 at least; a collective when sharded)."""
        ...

    def plain_model(
        self,
        model: nn.Module,
        full_state: dict[str, torch.Tensor],
        build: Callable[[], nn.Module],
    ) -> nn.Module:
        """The trained model as a plain module (for export), from `full_state(model)`;
        `build` makes a fresh one when the trained one is sharded."""
        ...


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
            _write_replica(path, state)
        return str(path) if storage.is_uri(path) else Path(path)

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
        where = str(path) if storage.is_uri(path) else Path(path)
        if dist.is_initialized() and dist.get_rank() != 0:
            return PendingSave.finished(where)
        state = to_host(_replica_state(model, optimizer, extra))
        return PendingSave.start(lambda: _write_replica(path, state, before_commit) or where)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        state = read_replica(path)
        _module(model).load_state_dict(state.pop("model"))
        saved_optimizer = state.pop("optimizer", None)
        if optimizer is not None and saved_optimizer is not None:
            optimizer.load_state_dict(saved_optimizer)
        return state

    def holds_checkpoint(self, path: str | os.PathLike) -> bool:
        if storage.is_uri(path):
            return str(path).endswith(".pt")  # one object, not a prefix of shards
        return Path(path).is_file()

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _module(model).state_dict()

    def plain_model(
        self,
        model: nn.Module,
        full_state: dict[str, torch.Tensor],
        build: Callable[[], nn.Module],
    ) -> nn.Module:
        return _module(model)


REPLICATED = Replicated()


def _replica_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any]
) -> dict[str, Any]:
    state = {**extra, "model": _module(model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def _write_replica(
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


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def wrapping_for(sharding: str, *, slices: Sequence[int] | None = None) -> ModelWrapping:
    """The wrapping of a sharding mode: "none" (a replica per rank, DDP), "optimizer" or
    "full" (`Sharded`), "proportional" (`Proportional`, with the plan's `state_slices`;
    None: equal shares)."""
    mode = check_sharding(sharding)
    if mode == "none":
        return REPLICATED
    if mode == "proportional":
        from autobatch.step.proportional import Proportional  # it imports this module's format

        return Proportional(slices)
    return Sharded(mode)  # type: ignore[arg-type]


def held_module(wrapped: nn.Module) -> nn.Module:
    """The module that holds this rank's parameters (the optimizer's, the checkpoint's):
    DDP's module; else the wrapped model itself (FSDP2 wraps in place; `Proportional`'s
    module holds the rank's slice)."""
    return _module(wrapped)
