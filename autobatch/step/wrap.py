"""How a rank's model is wrapped for data parallelism, and how each micro-step synchronises.

The seam of the optimizer step: the accumulator asks the wrapping for the context
of each micro-step and for the world its gradients are averaged over. Two
wrappings implement it: `Replicated`, a full replica per rank (torch DDP when a
process group of more than one rank is up), and `Sharded` (autobatch.step.shard:
FSDP2, "optimizer" or "full" sharding). `wrapping_for(sharding)` names one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.step.shard import SHARD_MODES, Sharded


class ModelWrapping(Protocol):
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


class Replicated:
    """A full replica per rank: DDP over the default process group when it has more than
    one rank, else the plain module.

    The forward must run inside `no_sync` too: a forward outside it arms DDP's
    all-reduce, and ranks with different micro-step counts would then issue different
    numbers of collectives and hang."""

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


REPLICATED = Replicated()


SHARDINGS: tuple[str, ...] = ("none", *SHARD_MODES)


def wrapping_for(sharding: str) -> ModelWrapping:
    """The wrapping of a sharding mode: "none" (a replica per rank, DDP), "optimizer" or
    "full" (`Sharded`)."""
    if sharding == "none":
        return REPLICATED
    if sharding not in SHARD_MODES:
        raise ValueError(f"sharding={sharding!r} must be one of {', '.join(map(repr, SHARDINGS))}")
    return Sharded(sharding)  # type: ignore[arg-type]
