"""Sharded data parallelism on torch's FSDP2 (`fully_shard`): the memory lever of the seam.

`Sharded(mode)` implements the same `ModelWrapping` as `Replicated` (wrap, micro_step,
world_size), so the accumulator's step, its loss weight (sum x world_size / N_global)
and its clipping are unchanged: FSDP2's reduce-scatter averages over ranks as DDP's
all-reduce does, and `clip_grad_norm_` on the DTensor gradients returns the global norm.

    mode         between optimizer steps   during the micro-steps         micro-step counts
    "optimizer"  params, grads, optimizer  params whole (one all-gather    may differ per rank
                 state: 1/N per rank       at the first forward), grads
                                           whole until one reduce-scatter
                                           at the last backward
    "full"       the same                  params gathered per block at    must be EQUAL on
                                           every forward and backward,     every rank
                                           grads reduce-scattered after
                                           every backward

"optimizer" keeps the plan's freedom (ranks run different numbers of micro-steps: each
rank issues exactly one all-gather and one reduce-scatter per unit and step); a rank
holds 1/N of the optimizer state always, and of the parameters and gradients between
steps. "full" (ZeRO-3) also keeps the parameters and the accumulated gradients sharded
during the micro-steps, at the price of collectives in every micro-step: a rank with
more micro-steps would wait for peers that never come (a hang, or gloo's timeout), so
check the plan with `check_plan` first. A unit is a block of `blocks(model)` (default:
`repeated_blocks`) or the root, which holds the rest and stays gathered from its forward
to the end of its backward.

Build the optimizer AFTER `wrap` (on the wrapped model's DTensor parameters). fp16 works
with the accumulator's own GradScaler: its inf check on DTensor gradients runs as a
DTensor op, so an inf in one rank's shard skips the step on every rank (tested).

Out of memory: DDP's no_sync micro-steps issue no collective, so the ranks can agree to
drop a step (`agree_on_oom`). Here a forward may be mid-way through its all-gathers
("full": any micro-step; "optimizer": the first), leaving the ranks' collectives
unmatched: treat an OOM as one in the synced backward (restart from the checkpoint).

A checkpoint is a directory of DCP shards that every rank writes (`autobatch.step.dcp`),
loadable on any number of ranks; the whole model is gathered to rank 0 for export.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from autobatch.errors import PlanError
from autobatch.levers import SHARD_MODES as SHARD_MODES  # benchmarks read them here too
from autobatch.levers import ShardMode, check_shard_mode
from autobatch.step import storage
from autobatch.step.background import PendingSave
from autobatch.step.dcp import begin_save_sharded, load_sharded, save_sharded

BlocksFn = Callable[[nn.Module], Iterable[nn.Module]]
"""model -> the submodules sharded as their own units (gathered one at a time)."""


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the outermost `nn.ModuleList`s that hold parameters: a transformer's
    blocks (TinyGPT.blocks, GPT-2's transformer.h, Llama's model.layers, also under a PEFT
    wrapper). Lists nested inside a block stay part of that block's unit."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(b for b in child if next(b.parameters(), None) is not None)
            else:
                visit(child)

    visit(model)
    return blocks


def unit_bytes(model: nn.Module, blocks: BlocksFn = repeated_blocks) -> tuple[int, int]:
    """(the largest block's parameter bytes, the bytes of the parameters outside every
    block): what full sharding gathers at once, for the memory model (U and R)."""
    counted: set[int] = set()

    def size(params: Iterable[nn.Parameter]) -> int:
        fresh = [p for p in params if id(p) not in counted]
        counted.update(id(p) for p in fresh)
        return sum(p.numel() * p.element_size() for p in fresh)

    largest = max((size(b.parameters()) for b in blocks(model)), default=0)
    return largest, size(model.parameters())


class Sharded:
    """Parameters, gradients and optimizer state sharded over the default process group
    with FSDP2; the plain module when there is no group or it has one rank.

    >>> wrapping = Sharded("optimizer")
    >>> model = wrapping.wrap(model, device)
    >>> acc = Accumulator(model, AdamW(model.parameters()), wrapping=wrapping)
    """

    retries_oom_in_place = False  # a forward may stop between its all-gathers
    checkpoint_suffix = ""  # a directory of shards

    def __init__(self, mode: ShardMode = "optimizer", *, blocks: BlocksFn = repeated_blocks):
        self.mode = check_shard_mode(mode)
        self.blocks = blocks

    @property
    def sharding(self) -> ShardMode:
        return self.mode

    def __repr__(self) -> str:
        return f"Sharded({self.mode!r})"

    def check_plan(self, micro_steps_per_rank: Sequence[int]) -> None:
        """Raises PlanError if this mode cannot run a plan whose ranks run these numbers of
        micro-steps per optimizer step (full sharding needs the same number everywhere)."""
        counts = list(micro_steps_per_rank)
        if self.mode == "full" and len(set(counts)) > 1:
            raise PlanError(
                f"Sharded('full') gathers the parameters at every micro-step, so every rank "
                f"must run the same number of micro-steps; the plan's ranks run {counts}: "
                "plan with equal accumulation steps or use Sharded('optimizer')"
            )

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model sharded in place (its class becomes an FSDP subclass): each block, then
        the root, which holds what is left (embeddings, head, final norm)."""
        model = model.to(device)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return model
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # "optimizer" keeps the gathered parameters through the forward; micro_step keeps
        # them through the backwards too, until the last. The root is never resharded
        # after its forward: the backward would gather it again at once.
        for block in self.blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=self.mode == "full")
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        return model

    def micro_step(self, wrapped: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        if not isinstance(wrapped, FSDPModule):
            return contextlib.nullcontext()
        return self._micro_step(wrapped, last=last)

    @contextlib.contextmanager
    def _micro_step(self, wrapped: FSDPModule, *, last: bool) -> Iterator[None]:
        # "optimizer": gradients stay whole and local, parameters gathered, until the last
        # backward. "full": every backward reduce-scatters, so only a shard of the gradients
        # accumulates (the ranks run equal micro-step counts, so the collectives match).
        sync = last or self.mode == "full"
        wrapped.set_requires_gradient_sync(sync)
        wrapped.set_reshard_after_backward(sync)
        yield

    def world_size(self, wrapped: nn.Module) -> int:
        return dist.get_world_size() if isinstance(wrapped, FSDPModule) else 1

    def save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> Path | str:
        """Collective: every rank writes its shards; rank 0 `extra` (small JSON)."""
        return save_sharded(path, model, optimizer, extra=extra, before_commit=before_commit)

    def begin_save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> PendingSave:
        """Collective: every rank's shards copied to host memory, then written in the
        background (DCP's async_save); complete on rank 0's `wait()`."""
        return begin_save_sharded(path, model, optimizer, extra=extra, before_commit=before_commit)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Collective, on any number of ranks (DCP reshards)."""
        return load_sharded(path, model, optimizer)

    def holds_checkpoint(self, path: str | os.PathLike) -> bool:
        if storage.is_uri(path):
            return not str(path).endswith(".pt")  # a prefix of shards, not a replica's object
        return Path(path).is_dir()

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective when the model is sharded: the whole state on rank 0, on the CPU."""
        if not isinstance(model, FSDPModule):
            return model.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    def plain_model(
        self,
        model: nn.Module,
        full_state: dict[str, torch.Tensor],
        build: Callable[[], nn.Module],
    ) -> nn.Module:
        """A fresh module with the full state (a sharded module's class is FSDP's)."""
        if not isinstance(model, FSDPModule):
            return model
        plain = build()
        plain.load_state_dict(full_state)
        return plain
