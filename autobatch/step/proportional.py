"""Memory-proportional sharding: each rank owns a contiguous slice, of a size the plan
chooses, of the model's flat trainable state (parameters, gradients, optimizer state).

FSDP2 and ZeRO split every tensor in equal chunks; here the slices differ per rank (a
large device holds more, a small one may hold nothing), so a device mix is limited by
its total memory rather than by its smallest device.

The trainable parameters (one dtype) are laid out flat unit by unit (the root, then each
block "full" shards as a unit: `autobatch.step.proportional_layout`); rank r owns
[start_r, start_r + size_r) of that layout (`Slices`; size_r may be 0) as pieces, one per
unit its range meets. Frozen parameters are not sharded: every rank keeps them
whole (a LoRA base). In a micro-step the root is gathered for the whole micro-step and
each block only while it runs forward and again for its backward, its gradient reduced
into its owners' pieces right after (`autobatch.step.proportional_module`). So a rank
holds its slice, its gradient and its AdamW state, plus the root and the largest block
gathered with their gradients (`state_bytes`); the optimizer (AdamW) steps on the pieces
only, and clipping uses the global norm (one all-reduce).

A checkpoint is a replica's file: the slices gathered into the plain module's state
dict and an AdamW state over its trainable parameters (`replica_optimizer_state`), and
any ranks with any shares load their slices from it (`load_replica`).

Not (yet): fp16 loss scaling (a GradScaler's inf check would see only this rank's slice),
host offload, prefetching the next block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autobatch.errors import PlanError
from autobatch.step import storage
from autobatch.step.collective import collective_device
from autobatch.step.proportional_layout import (
    ADAM_STATES as ADAM_STATES,
)
from autobatch.step.proportional_layout import (
    ADAM_STEP_BYTES as ADAM_STEP_BYTES,
)
from autobatch.step.proportional_layout import Layout as Layout
from autobatch.step.proportional_layout import Slices as Slices
from autobatch.step.proportional_layout import state_bytes as state_bytes
from autobatch.step.proportional_module import ProportionalModule as ProportionalModule
from autobatch.step.proportional_module import trainable
from autobatch.step.replicated import REPLICATED, read_replica, write_replica

KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element states


# ---------------------------------------------------------------------------
# checkpoints: the replica's format, resumable on any ranks and shares


def replica_optimizer_state(model: ProportionalModule, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: `optimizer`'s state (AdamW over the pieces) as the state dict of an
    AdamW over the plain module's trainable parameters (one group, `parameters()` order)."""
    owned = [p for p, _, _ in model.owned()]
    states = [optimizer.state.get(p, {}) for p in owned]
    steps = torch.tensor(
        [max((float(st["step"]) for st in states if "step" in st), default=0.0)],
        device=collective_device(model.device),  # nccl reduces only GPU tensors
    )
    if model.world > 1:
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    flats = {k: model.unflatten(model.gather_flat([st.get(k) for st in states])) for k in KEYS}
    layout_index = {id(p): i for i, p in enumerate(model.params)}
    order = [layout_index[id(p)] for p in trainable(model.inner)]
    per_param: dict[int, dict] = {}
    if steps.item() > 0:
        for j, i in enumerate(order):
            per_param[j] = {"step": torch.tensor(steps.item())}
            per_param[j].update({key: flats[key][i] for key in KEYS})
    (group,) = optimizer.state_dict()["param_groups"]
    return {"state": per_param, "param_groups": [{**group, "params": list(range(len(order)))}]}


def load_replica(
    model: ProportionalModule,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: dict | None,
) -> None:
    """A replica's state dicts (`full_state_dict`, `replica_optimizer_state`, or a
    Replicated checkpoint's) into this rank's pieces and its optimizer."""
    names = {id(p): n for n, p in model.inner.named_parameters()}
    flat = torch.cat([model_state[names[id(p)]].reshape(-1) for p in model.params])
    layout = {id(p) for p in model.params}
    with torch.no_grad():
        for piece, start, size in model.owned():
            piece.copy_(flat[start : start + size])
        for name, p in model.inner.named_parameters():
            if id(p) not in layout:
                p.copy_(model_state[name])
    if optimizer is None or optimizer_state is None:
        return
    state = {}
    saved = optimizer_state["state"]
    if saved:
        position = {id(p): j for j, p in enumerate(trainable(model.inner))}
        for key in KEYS:
            whole = torch.cat([saved[position[id(p)]][key].reshape(-1) for p in model.params])
            for k, (_, start, size) in enumerate(model.owned()):
                state.setdefault(k, {"step": saved[0]["step"].clone()})
                state[k][key] = whole[start : start + size].clone()
    (group,) = optimizer_state["param_groups"]
    params = list(range(len(model.pieces)))
    optimizer.load_state_dict({"state": state, "param_groups": [{**group, "params": params}]})


# ---------------------------------------------------------------------------
# the wrapping (the seam: autobatch.step.wrap.ModelWrapping)


class Proportional:
    """Memory-proportional sharding over the default process group: rank r owns the
    share `shares[r]` of the flat trainable state (`ProportionalModule`); the plain module
    when there is no group or it has one rank. `shares` None: equal shares. A plan's
    `state_slices` (element counts) are shares too: on the model they were planned for they
    are its exact slices.

    >>> wrapping = Proportional((0.7, 0.25, 0.05))
    >>> model = wrapping.wrap(model, device)
    >>> acc = Accumulator(model, AdamW(model.parameters()), wrapping=wrapping)

    A checkpoint is a replica's (`autobatch.step.wrap.Replicated`): rank 0 writes one torch
    file with the whole model and an AdamW state over the plain module's parameters,
    gathered from the slices; every rank loads its slice from it. So a checkpoint resumes
    on any ranks, any shares and any mode.
    """

    sharding = "proportional"
    retries_oom_in_place = False  # every micro-step gathers: an OOM leaves collectives unmatched
    checkpoint_suffix = ".pt"  # a replica's one file
    scales_fp16 = False  # a GradScaler's inf check would see only this rank's slice

    def __init__(self, shares: Sequence[float] | None = None) -> None:
        if shares is not None:
            Slices.from_shares(1, shares)  # checks them
        self.shares = None if shares is None else tuple(float(s) for s in shares)

    def __repr__(self) -> str:
        return f"Proportional({None if self.shares is None else list(self.shares)})"

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = model.to(device)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return model
        W = dist.get_world_size()
        shares = self.shares if self.shares is not None else (1.0,) * W
        if len(shares) != W:
            raise PlanError(
                f"Proportional has {len(shares)} shares; the group has {W} ranks: give one "
                "share per rank"
            )
        total = sum(p.numel() for p in trainable(model))
        return ProportionalModule(model, Slices.from_shares(total, shares))

    def micro_step(self, wrapped: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        if not isinstance(wrapped, ProportionalModule):
            return contextlib.nullcontext()
        return wrapped.gathered()

    def world_size(self, wrapped: nn.Module) -> int:
        return wrapped.world if isinstance(wrapped, ProportionalModule) else 1

    def check_plan(self, micro_steps_per_rank: Sequence[int]) -> None:
        """Every micro-step gathers and reduces on every rank: equal counts only."""
        counts = list(micro_steps_per_rank)
        if len(set(counts)) > 1:
            raise PlanError(
                f"Proportional gathers the parameters at every micro-step, so every rank must "
                f"run the same number of micro-steps; the plan's ranks run {counts}: plan "
                "with equal accumulation steps"
            )

    def clip_grad_norm(self, wrapped: nn.Module, max_norm: float) -> float:
        """The global norm over the ranks' slices (one all-reduce), clipped to `max_norm`."""
        if isinstance(wrapped, ProportionalModule):
            return wrapped.clip_grad_norm_(max_norm)
        params = [p for p in wrapped.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # -- checkpoints and the whole model: a replica's -------------------------------
    def save(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, Any],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> Path | str:
        """Collective: the slices gathered into a replica's state; rank 0 writes its file."""
        if not isinstance(model, ProportionalModule):
            return REPLICATED.save(path, model, optimizer, extra, before_commit=before_commit)
        state = {**extra, "model": model.full_state_dict()}
        if optimizer is not None:
            state["optimizer"] = replica_optimizer_state(model, optimizer)
        if model.rank == 0:
            if before_commit is not None:
                before_commit()
            write_replica(path, state)
        return storage.location(path)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Every rank reads the replica's file and keeps its slice (of any saved world)."""
        if not isinstance(model, ProportionalModule):
            return REPLICATED.load(path, model, optimizer)
        state = read_replica(path)
        load_replica(model, state.pop("model"), optimizer, state.pop("optimizer", None))
        return state

    def holds_checkpoint(self, path: str | os.PathLike) -> bool:
        return REPLICATED.holds_checkpoint(path)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective: the plain module's state dict, whole, on every rank."""
        if isinstance(model, ProportionalModule):
            return model.full_state_dict()
        return model.state_dict()

    def plain_model(
        self,
        model: nn.Module,
        full_state: dict[str, torch.Tensor],
        build: Callable[[], nn.Module],
    ) -> nn.Module:
        """A fresh module with the full state (the sharded one's parameters are empty)."""
        if not isinstance(model, ProportionalModule):
            return model
        plain = build()
        plain.load_state_dict(full_state)
        return plain
