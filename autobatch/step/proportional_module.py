"""The module of memory-proportional sharding: this rank's pieces of the flat trainable
state, and the units gathered while they run (`autobatch.step.proportional_layout`).

Each micro-step (`ProportionalModule.gathered()`, the wrapping's `micro_step`), on every
rank:

    enter     the root unit gathered (each owner broadcasts its part into the unit's
              buffer), its zero gradient allocated; the pieces' gradients allocated
              (zeros) when the step has none yet
    forward   before each block: the block gathered; after it: its parameters freed
    backward  before each block's backward (a hook on its outputs' gradients): the block
              gathered again and a zero gradient allocated; once every parameter of the
              block has its gradient (`register_post_accumulate_grad_hook`), or else once
              the gradients of its inputs are computed (a parameter that got none: an
              identity on the block's inputs, `_InputsDone`): each owner's part reduced
              (SUM) to it, which adds it / W to its pieces' gradients; the block's
              parameters and gradient freed
    exit      every unit not yet reduced (the root; a block without gradients) reduced in
              the backward's order (the last block first, the root last), the root freed

A unit's parameters are views of one buffer per unit; freeing it resizes that buffer's
storage to 0 and gathering resizes it back (as FSDP2 does), so the views autograd saved
in the forward (a weight's transpose) see the gathered values again in the backward
rather than keeping the forward's copy alive. Every rank issues the same collectives in
the same order, so ranks run equal numbers of micro-steps (as under "full"). Gradient
checkpointing that recomputes a block inside its backward finds it gathered.

Why broadcasts and reduces per owner, not a padded all-gather / reduce-scatter: those
need equal chunks, so slices would be padded to the largest; per-owner collectives write
straight into the unit's buffer and nothing is padded.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from autobatch.errors import PlanError
from autobatch.step.collective import collective_device
from autobatch.step.proportional_layout import Layout, Slices
from autobatch.step.shard import repeated_blocks


def trainable(module: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def units_of(module: nn.Module) -> tuple[list[nn.Module], list[list[nn.Parameter]]]:
    """The blocks (FSDP2's units: `repeated_blocks`) and the trainable parameters of each
    unit: [root, block 1, ...], the root holding what no block does."""
    blocks = repeated_blocks(module)
    seen: set[int] = set()
    per_block = []
    for block in blocks:
        params = [p for p in trainable(block) if id(p) not in seen]
        seen.update(id(p) for p in params)
        per_block.append(params)
    root = [p for p in trainable(module) if id(p) not in seen]
    kept = [(b, ps) for b, ps in zip(blocks, per_block, strict=True) if ps]
    return [b for b, _ in kept], [root, *(ps for _, ps in kept)]


class ProportionalModule(nn.Module):
    """A module whose trainable parameters are split across the ranks by `slices` over the
    unit-by-unit layout; this rank keeps only its pieces (`self.pieces`, its parameters;
    one empty piece when it owns nothing). Call it inside `gathered()`."""

    def __init__(self, module: nn.Module, slices: Slices) -> None:
        super().__init__()
        object.__setattr__(self, "inner", module)  # not a submodule: parameters() = the pieces
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        blocks, unit_params = units_of(module)
        self.params = [p for ps in unit_params for p in ps]
        if not self.params:
            raise PlanError("proportional sharding needs trainable parameters; the model has none")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise PlanError(
                f"proportional sharding flattens the trainable parameters into one layout; "
                f"they have dtypes {sorted(map(str, dtypes))}: give them one dtype"
            )
        units = [u for u, ps in enumerate(unit_params) for _ in ps]
        total = sum(p.numel() for p in self.params)
        if len(slices.sizes) != self.world or slices.total != total:
            raise PlanError(
                f"slice sizes {list(slices.sizes)} must be one per rank ({self.world}) and "
                f"sum to the model's {total} trainable elements"
            )
        self.layout = Layout(tuple(p.numel() for p in self.params), tuple(units), slices)
        self.slices = slices
        self.shapes = [p.shape for p in self.params]
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.piece_map = self.layout.pieces(self.rank)
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        pieces = [nn.Parameter(flat[x.start : x.start + x.size].clone()) for x in self.piece_map]
        self.pieces = nn.ParameterList(pieces or [nn.Parameter(flat[:0].clone())])
        del flat
        n_units = self.layout.n_units
        self.bounds = [self.layout.unit_bounds(u) for u in range(n_units)]
        self.unit_params = [
            [i for i, v in enumerate(units) if v == u] for u in range(n_units)
        ]  # fmt: skip
        # a unit's buffer keeps its storage object; freeing resizes it to 0 bytes
        self.unit_buffers = [torch.empty(hi - lo, dtype=self.dtype, device=self.device)
                         for lo, hi in self.bounds]  # fmt: skip
        self.grads: list[torch.Tensor | None] = [None] * n_units
        self.phase = ["free"] * n_units  # free, forward, backward, reduced
        self.watched = [False] * n_units  # the block's inputs watched in this micro-step
        self.pending = [0] * n_units  # parameters whose gradient is still to come
        for u in range(n_units):
            self._free(u)
        self.active = False
        self.hooks = []
        for u, block in enumerate(blocks, start=1):
            pre_forward = self._pre_forward(u)
            self.hooks.append(block.register_forward_pre_hook(pre_forward, with_kwargs=True))
            self.hooks.append(block.register_forward_hook(self._post_forward(u)))
        for i, p in enumerate(self.params):
            self.hooks.append(p.register_post_accumulate_grad_hook(self._accumulated(i)))

    @property
    def total(self) -> int:
        return self.slices.total

    def owned(self) -> list[tuple[nn.Parameter, int, int]]:
        """(piece, start, size) for each piece this rank owns, in layout order."""
        return [(p, x.start, x.size) for p, x in zip(self.pieces, self.piece_map)]

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if not self.active:
            raise RuntimeError("ProportionalModule runs inside gathered() (a micro-step)")
        return self.inner(*args, **kwargs)

    # -- one micro-step ------------------------------------------------------
    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The root gathered for the body (forward and backward), blocks gathered as they
        run; on a normal exit every unit's gradient is in its owners' pieces. Everything
        gathered is freed on any exit (an exception skips the reduces: the ranks'
        collectives are unmatched then, as under FSDP, and the job restarts)."""
        for piece, _, _ in self.owned():
            if piece.grad is None:
                piece.grad = torch.zeros_like(piece)
        try:
            self.active = True
            self._gather(0, grads=True)
            yield
            for u in reversed(range(self.layout.n_units)):  # the backward's order, root last
                if self.phase[u] != "reduced":
                    if self.grads[u] is None:  # never reached its backward: a zero gradient
                        self._gather(u, grads=True)
                    self._reduce(u)
        finally:
            self.active = False
            for u in range(self.layout.n_units):
                self._free(u)
                self.phase[u] = "free"
                self.watched[u] = False

    def _gather(self, u: int, *, grads: bool) -> None:
        """Unit u's parameters gathered into its buffer (once), with a zero gradient."""
        buf = self.unit_buffers[u]
        lo, hi = self.bounds[u]
        if buf.untyped_storage().nbytes() == 0 and hi > lo:
            buf.untyped_storage().resize_((hi - lo) * buf.element_size())
            buf.detach()  # an op: a memory counter (TensorMemory) sees the storage's new size
            with torch.no_grad():
                for piece, start, size in self.owned():
                    if lo <= start < hi:
                        buf[start - lo : start - lo + size].copy_(piece.detach())
                for owner, a, b in self.layout.owners(u):
                    if self.world > 1:
                        dist.broadcast(buf[a - lo : b - lo], src=owner)
            self._views(u, buf, "data")
        if grads and self.grads[u] is None:
            self.grads[u] = torch.zeros(hi - lo, dtype=self.dtype, device=self.device)
            self._views(u, self.grads[u], "grad")
            self.pending[u] = len(self.unit_params[u])

    def _views(self, u: int, flat: torch.Tensor, attr: str) -> None:
        offset = 0
        for i in self.unit_params[u]:
            n = self.layout.param_sizes[i]
            setattr(self.params[i], attr, flat[offset : offset + n].view(self.shapes[i]))
            offset += n

    def _free(self, u: int) -> None:
        """Unit u's parameters (their storage to 0 bytes, the views saved for backward
        too) and gradient freed."""
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for i in self.unit_params[u]:
            self.params[i].grad = None
            self.params[i].data = empty
        self.unit_buffers[u].untyped_storage().resize_(0)
        self.unit_buffers[u].detach()  # and its size 0 (no op sees a storage's resize_)
        self.grads[u] = None

    def _reduce(self, u: int) -> None:
        """Each owner's part of unit u's gradient summed into it, / W into its pieces."""
        grad = self.grads[u]
        lo = self.bounds[u][0]
        assert grad is not None
        for owner, a, b in self.layout.owners(u):
            part = grad[a - lo : b - lo]
            if self.world > 1:
                dist.reduce(part, dst=owner)
            if owner == self.rank:
                part.div_(self.world)  # the ranks' average, as DDP's all-reduce
                for piece, start, size in self.owned():
                    if a <= start < b:
                        piece.grad.add_(part[start - a : start - a + size])
        self.phase[u] = "reduced"

    # -- the hooks of a block --------------------------------------------------
    def _pre_forward(self, u: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if not self.active or self.phase[u] != "free":
                return None  # recomputed inside its backward (checkpointing): gathered
            self._gather(u, grads=False)
            self.phase[u] = "forward"
            if self.watched[u]:
                return None  # called again in this micro-step: its first call's inputs tell
            self.watched[u] = True
            leaves, spec = tree_flatten((args, kwargs))
            at = [i for i, x in enumerate(leaves) if torch.is_tensor(x) and x.requires_grad]
            if not at:
                return None
            on_done = functools.partial(self._inputs_done, u)
            for i, x in zip(at, _InputsDone.apply(on_done, *(leaves[i] for i in at))):
                leaves[i] = x
            return tree_unflatten(leaves, spec)

        return hook

    def _inputs_done(self, u: int) -> None:
        """The gradients of block u's inputs are computed, so every gradient its parameters
        get has been accumulated (autograd runs those first): a parameter still without one
        got none in this micro-step; the block is reduced and freed now, not at the end."""
        if self.active and self.phase[u] == "backward":
            self._reduce(u)
            self._free(u)

    def _post_forward(self, u: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            if not self.active or self.phase[u] != "forward":
                return output  # recomputed inside its backward (checkpointing): keep it
            self._free(u)
            self.phase[u] = "free"
            outs = [t for t in _tensors(output) if t.requires_grad]
            for t in outs:
                t.register_hook(self._pre_backward(u))
            return output

        return hook

    def _pre_backward(self, u: int):  # noqa: ANN202
        def hook(grad: torch.Tensor) -> None:
            if self.phase[u] == "free":
                self._gather(u, grads=True)
                self.phase[u] = "backward"

        return hook

    def _accumulated(self, i: int):  # noqa: ANN202
        u = self.layout.param_units[i]

        def hook(param: torch.Tensor) -> None:
            if u == 0 or not self.active:
                return  # the root is reduced at the micro-step's exit
            if self.phase[u] != "backward":
                raise RuntimeError(
                    f"a gradient of unit {u} came outside its backward: proportional "
                    "sharding needs each block's parameters used inside that block only"
                )
            self.pending[u] -= 1
            if self.pending[u] == 0:
                self._reduce(u)
                self._free(u)

        return hook

    # -- the optimizer step's part --------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the pieces' gradients so the global norm is at most `max_norm`, as
        torch.nn.utils.clip_grad_norm_ on a replica; returns the norm before clipping."""
        sq = torch.zeros(1, dtype=torch.float64, device=collective_device(self.device))
        grads = [p.grad for p in self.pieces if p.grad is not None]
        for g in grads:
            sq += g.detach().double().pow(2).sum().to(sq.device)
        if self.world > 1:
            dist.all_reduce(sq)
        norm = float(sq.sqrt())
        for g in grads:
            g.mul_(min(1.0, max_norm / (norm + 1e-6)))
        return norm

    # -- the whole model --------------------------------------------------------
    def gather_flat(self, mine: list[torch.Tensor | None]) -> torch.Tensor:
        """Collective: the flat layout (P elements) whose owners' parts are their `mine`
        (one tensor per owned piece, None: zeros)."""
        full = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for (_, start, size), t in zip(self.owned(), mine, strict=True):
            if t is not None:
                full[start : start + size].copy_(t.detach().reshape(-1))
        for owner in range(self.world):
            lo, hi = self.slices.bounds(owner)
            if lo < hi and self.world > 1:
                dist.broadcast(full[lo:hi], src=owner)
        return full

    def full_flat(self) -> torch.Tensor:
        """Collective: the whole flat parameter layout, on every rank (a copy)."""
        return self.gather_flat([p for p, _, _ in self.owned()])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The layout's parameters from a flat tensor (copies), in layout order."""
        return [
            flat[self.layout.param_start(i) : self.layout.param_start(i) + n]
            .view(self.shapes[i])
            .clone()
            for i, n in enumerate(self.layout.param_sizes)
        ]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the plain module's state dict with every parameter whole (copies)."""
        whole = dict(zip(map(id, self.params), self.unflatten(self.full_flat()), strict=True))
        state = {}
        for name, tensor in self.inner.state_dict(keep_vars=True).items():
            got = whole.get(id(tensor))
            state[name] = tensor.detach().clone() if got is None else got
        return state


class _InputsDone(torch.autograd.Function):
    """Identity on a block's inputs; its backward calls `done` (as FSDP2's post-backward
    hook on a unit's inputs)."""

    @staticmethod
    def forward(ctx, done, *inputs):  # noqa: ANN001, ANN002, ANN205
        ctx.done = done
        return inputs

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN002, ANN205
        ctx.done()
        return (None, *grads)


def _tensors(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
