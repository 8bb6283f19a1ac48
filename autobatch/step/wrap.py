"""How a rank's model is wrapped for data parallelism: the seam of every memory lever.

A wrapping says how each micro-step synchronises (the accumulator asks it for the
context of each micro-step and for the world its gradients are averaged over), and
owns everything that depends on how the ranks hold the model: which plans can run,
whether an out-of-memory can be retried in place, the checkpoint's format (save,
load), and the whole model (its full state, the plain module for export). Three
wrappings implement it: `Replicated` (autobatch.step.replicated), a full replica per
rank (torch DDP when a process group of more than one rank is up); `Sharded`
(autobatch.step.shard: FSDP2, "optimizer" or "full" sharding); and `Proportional`
(autobatch.step.proportional: planned slices of the flat state, checkpoints in the
replica's format). `wrapping_for(sharding)` names one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from autobatch.levers import check_sharding
from autobatch.step.background import PendingSave
from autobatch.step.replicated import REPLICATED, Replicated, read_replica, replica_module
from autobatch.step.shard import Sharded

__all__ = [
    "REPLICATED",
    "ModelWrapping",
    "Replicated",
    "held_module",
    "read_replica",
    "wrapping_for",
]


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


def wrapping_for(sharding: str, *, slices: Sequence[int] | None = None) -> ModelWrapping:
    """The wrapping of a sharding mode: "none" (a replica per rank, DDP), "optimizer" or
    "full" (`Sharded`), "proportional" (`Proportional`, with the plan's `state_slices`;
    None: equal shares)."""
    mode = check_sharding(sharding)
    if mode == "none":
        return REPLICATED
    if mode == "proportional":
        from autobatch.step.proportional import Proportional  # it imports this module's Protocol

        return Proportional(slices)
    return Sharded(mode)  # type: ignore[arg-type]


def held_module(wrapped: nn.Module) -> nn.Module:
    """The module that holds this rank's parameters (the optimizer's, the checkpoint's):
    DDP's module; else the wrapped model itself (FSDP2 wraps in place; `Proportional`'s
    module holds the rank's slice)."""
    return replica_module(wrapped)
