"""Memory-proportional sharding: each rank owns a contiguous slice, of a size the plan
chooses, of the model's flat trainable state (parameters, gradients, optimizer state).

FSDP2 and ZeRO split every tensor in equal chunks; here the slices differ per rank (a
large device holds more, a small one may hold nothing), so a device mix is limited by
its total memory rather than by its smallest device.

One sharding unit: the model's trainable parameters (one dtype) flattened in
`named_parameters()` order into one buffer of P elements. Rank r owns elements
[start_r, start_r + size_r) (`Slices`; size_r may be 0). Frozen parameters are not
sharded: every rank keeps them whole (a LoRA base).

Each micro-step (the wrapping's `micro_step` context), on every rank:

    enter   allocate the full flat parameters (P elements); each owner broadcasts its
            slice into its place; the module's parameters become views into it; allocate
            the full flat gradient (P elements, zeros), the parameters' .grad views into it
    body    forward and backward (autograd accumulates into the gradient views)
    exit    each owner's part of the flat gradient is reduced (SUM) to that owner, which
            adds it / W to its slice's gradient; both full buffers are freed

So every micro-step issues the same collectives on every rank: ranks run equal numbers of
micro-steps (as under "full"). The optimizer (AdamW) steps on the rank's slice only
(`ProportionalModule.parameters()` yields just the slice); clipping uses the global norm
(`clip_grad_norm_`: one all-reduce of the slices' squared norms).

Why broadcasts and reduces per owner, not a padded all-gather / reduce-scatter: gloo has
both (torch 2.13: `all_gather_into_tensor`, `reduce_scatter_tensor`), but they need equal
chunks, so slices would be padded to the largest one: W * max(size_r) elements, 2.1 P
for shares 70/25/5 on 3 ranks, beside the trimmed P. Per-owner collectives write
straight into the flat buffer's contiguous slice: nothing is padded, the transient is
exactly P parameters + P gradients, and each rank still sends/receives about P elements.
Their cost is W collective launches per micro-step instead of one (to coalesce on NCCL).

Memory (bytes, e = element size, s = this rank's slice, P = all trainable elements):
`state_bytes` below; tests/test_proportional.py checks it against the tensors held.

Not (yet): fp16 loss scaling (a GradScaler's inf check would see only this rank's slice),
per-block units (the whole flat model is gathered at once), host offload.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autobatch.errors import PlanError
from autobatch.step import storage
from autobatch.step.replicated import REPLICATED, read_replica, write_replica

ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, each the size of the slice
ADAM_STEP_BYTES = 4  # AdamW's `step`: a float32 scalar per parameter (here one: the slice)


# ---------------------------------------------------------------------------
# the slices: pure values


@dataclass(frozen=True)
class Slices:
    """Contiguous slices of a flat buffer of `total` elements, one per rank, in rank order."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 0 for s in self.sizes):
            raise PlanError(f"slice sizes {list(self.sizes)} must be >= 0, one per rank")

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def start(self, rank: int) -> int:
        return sum(self.sizes[:rank])

    def bounds(self, rank: int) -> tuple[int, int]:
        start = self.start(rank)
        return start, start + self.sizes[rank]

    @classmethod
    def from_shares(cls, total: int, shares: Sequence[float]) -> Slices:
        """Sizes proportional to `shares` (>= 0, not all 0), summing to `total`: the
        floors, then one more element to the largest remainders (ties: the lower rank)."""
        if not shares or any(not s >= 0 for s in shares) or sum(shares) <= 0:
            raise PlanError(f"shares={list(shares)} must be >= 0 and not all 0, one per rank")
        norm = sum(shares)
        exact = [total * s / norm for s in shares]
        sizes = [int(x) for x in exact]
        order = sorted(range(len(shares)), key=lambda r: (-(exact[r] - sizes[r]), r))
        for r in order[: total - sum(sizes)]:
            sizes[r] += 1
        return cls(tuple(sizes))


def state_bytes(
    slice_elems: int, total_elems: int, element_size: int, *, stepped: bool = True
) -> dict[str, int]:
    """What a rank's proportional state holds at its peak, by part (bytes).

    slice           its parameters' slice                         s e
    slice_grad      its slice's gradient (from the first reduce)  s e
    optimizer       AdamW's two states of the slice, its step     2 s e + 4   (once stepped;
                                                                  0 when s = 0: no gradient)
    full_params     the gathered flat parameters (transient)      P e
    full_grads      the flat gradient of the micro-step (transient) P e

    The peak is in every micro-step's exit, when the first reduce has made the slice's
    gradient while both full buffers are alive; between steps a rank holds slice and
    optimizer only. Activations are the model's own (the replica's lines)."""
    s, P, e = slice_elems, total_elems, element_size
    return {
        "slice": s * e,
        "slice_grad": s * e,
        "optimizer": ADAM_STATES * s * e + ADAM_STEP_BYTES if stepped and s else 0,
        "full_params": P * e,
        "full_grads": P * e,
    }


# ---------------------------------------------------------------------------
# the sharded model


class ProportionalModule(nn.Module):
    """A module whose trainable parameters live as one flat buffer split across the ranks
    by `slices`; this rank keeps only its slice (`self.slice`, an nn.Parameter, maybe of 0
    elements). Call it inside `gathered()` (the wrapping's micro-step does)."""

    def __init__(self, module: nn.Module, slices: Sequence[int] | Slices) -> None:
        super().__init__()
        object.__setattr__(self, "inner", module)  # not a submodule: parameters() = the slice
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.params = _trainable(module)
        if not self.params:
            raise PlanError("proportional sharding needs trainable parameters; the model has none")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise PlanError(
                f"proportional sharding flattens the trainable parameters into one buffer; "
                f"they have dtypes {sorted(map(str, dtypes))}: give them one dtype"
            )
        self.numels = [p.numel() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        total = sum(self.numels)
        self.slices = slices if isinstance(slices, Slices) else Slices(tuple(slices))
        if len(self.slices.sizes) != self.world or self.slices.total != total:
            raise PlanError(
                f"slice sizes {list(self.slices.sizes)} must be one per rank ({self.world}) "
                f"and sum to the model's {total} trainable elements"
            )
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        lo, hi = self.slices.bounds(self.rank)
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.slice = nn.Parameter(flat[lo:hi].clone())
        del flat
        self._release()
        self.full_params: torch.Tensor | None = None
        self.full_grads: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.slices.total

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if self.full_params is None:
            raise RuntimeError("ProportionalModule runs inside gathered() (a micro-step)")
        return self.inner(*args, **kwargs)

    # -- one micro-step ------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full parameters and a zero gradient for the body (forward and backward); on a
        normal exit the gradient is reduced into the owners' slices. Both buffers are freed
        on any exit (an exception skips the reduce: the ranks' collectives are unmatched
        then, as under FSDP, and the job restarts from its checkpoint)."""
        try:
            self._gather()
            yield
            self._reduce()
        finally:
            self._release()

    def _gather(self) -> None:
        full = torch.empty(self.total, dtype=self.dtype, device=self.device)
        for owner in range(self.world):
            lo, hi = self.slices.bounds(owner)
            if lo == hi:
                continue
            part = full[lo:hi]
            if owner == self.rank:
                part.copy_(self.slice.detach())
            if self.world > 1:
                dist.broadcast(part, src=owner)
        grads = torch.zeros_like(full)
        self.full_params, self.full_grads = full, grads
        offset = 0
        for p, n, shape in zip(self.params, self.numels, self.shapes, strict=True):
            p.data = full[offset : offset + n].view(shape)
            p.grad = grads[offset : offset + n].view(shape)
            offset += n

    def _reduce(self) -> None:
        for owner in range(self.world):
            lo, hi = self.slices.bounds(owner)
            if lo == hi:
                continue
            part = self.full_grads[lo:hi]
            if self.world > 1:
                dist.reduce(part, dst=owner)
            if owner == self.rank:
                part.div_(self.world)  # the ranks' average, as DDP's all-reduce; in place:
                if self.slice.grad is None:  # no temporary beside the slice's gradient
                    self.slice.grad = part.clone()
                else:
                    self.slice.grad.add_(part)

    def _release(self) -> None:
        """Parameters and gradients back to empty: the full buffers are freed."""
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for p in self.params:
            p.data = empty
            p.grad = None
        self.full_params = self.full_grads = None

    # -- the optimizer step's part --------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the slices' gradients so the global norm is at most `max_norm`, as
        torch.nn.utils.clip_grad_norm_ on a replica; returns the norm before clipping."""
        grad = self.slice.grad
        sq = torch.zeros(1, dtype=torch.float64)
        if grad is not None and grad.numel():
            sq += grad.detach().double().pow(2).sum().cpu()
        if self.world > 1:
            dist.all_reduce(sq)
        norm = float(sq.sqrt())
        if grad is not None:
            grad.mul_(min(1.0, max_norm / (norm + 1e-6)))
        return norm

    # -- the whole model --------------------------------------------------------
    def full_flat(self) -> torch.Tensor:
        """Collective: the whole flat parameter buffer, on every rank (a copy)."""
        with torch.no_grad():
            self._gather()
            try:
                return self.full_params.clone()
            finally:
                self._release()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the plain module's state dict with every parameter whole (copies)."""
        flat = self.full_flat()
        state = {}
        trainable = {id(p): i for i, p in enumerate(self.params)}
        offsets = [sum(self.numels[:i]) for i in range(len(self.params))]
        for name, tensor in self.inner.state_dict(keep_vars=True).items():
            i = trainable.get(id(tensor))
            if i is None:
                state[name] = tensor.detach().clone()
            else:
                n = self.numels[i]
                state[name] = flat[offsets[i] : offsets[i] + n].view(self.shapes[i]).clone()
        return state

    # -- checkpoints: the replica's format, resumable on any ranks and shares ----------
    def _gather_flat(self, mine: torch.Tensor | None) -> torch.Tensor:
        """Collective: a flat buffer of P elements whose owners' parts are their `mine`."""
        full = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for owner in range(self.world):
            lo, hi = self.slices.bounds(owner)
            if lo == hi:
                continue
            if owner == self.rank and mine is not None:
                full[lo:hi].copy_(mine.detach())
            if self.world > 1:
                dist.broadcast(full[lo:hi], src=owner)
        return full

    def replica_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: `optimizer`'s state (AdamW over the slice) as the state dict of an
        AdamW over the plain module's trainable parameters (one group, in order)."""
        state = optimizer.state.get(self.slice, {})
        steps = torch.tensor([float(state["step"]) if "step" in state else 0.0])
        if self.world > 1:
            dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        flats = {key: self._gather_flat(state.get(key)) for key in ("exp_avg", "exp_avg_sq")}
        per_param: dict[int, dict] = {}
        if steps.item() > 0:
            offset = 0
            for i, (n, shape) in enumerate(zip(self.numels, self.shapes, strict=True)):
                per_param[i] = {"step": torch.tensor(steps.item())}
                for key, flat in flats.items():
                    per_param[i][key] = flat[offset : offset + n].view(shape).clone()
                offset += n
        (group,) = optimizer.state_dict()["param_groups"]
        return {
            "state": per_param,
            "param_groups": [{**group, "params": list(range(len(self.params)))}],
        }

    def load_replica(
        self,
        model_state: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        optimizer_state: dict | None,
    ) -> None:
        """A replica's state dicts (`full_state_dict`, `replica_optimizer_state`, or a
        Replicated checkpoint's) into this rank's slice and its optimizer."""
        lo, hi = self.slices.bounds(self.rank)
        names = {id(p): n for n, p in self.inner.named_parameters()}
        flat = torch.cat([model_state[names[id(p)]].reshape(-1) for p in self.params])
        with torch.no_grad():
            self.slice.copy_(flat[lo:hi])
            trainable = {id(p) for p in self.params}
            for name, p in self.inner.named_parameters():
                if id(p) not in trainable:
                    p.copy_(model_state[name])
        if optimizer is None or optimizer_state is None:
            return
        state = {}
        saved = optimizer_state["state"]
        if saved and hi > lo:
            state[0] = {"step": saved[0]["step"].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                whole = torch.cat([saved[i][key].reshape(-1) for i in range(len(self.params))])
                state[0][key] = whole[lo:hi].clone()
        (group,) = optimizer_state["param_groups"]
        optimizer.load_state_dict({"state": state, "param_groups": [{**group, "params": [0]}]})


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


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
        total = sum(p.numel() for p in _trainable(model))
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
            state["optimizer"] = model.replica_optimizer_state(optimizer)
        if model.rank == 0:
            if before_commit is not None:
                before_commit()
            write_replica(path, state)
        return str(path) if storage.is_uri(path) else Path(path)

    def load(
        self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Every rank reads the replica's file and keeps its slice (of any saved world)."""
        if not isinstance(model, ProportionalModule):
            return REPLICATED.load(path, model, optimizer)
        state = read_replica(path)
        model.load_replica(state.pop("model"), optimizer, state.pop("optimizer", None))
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
