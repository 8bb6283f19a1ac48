"""Where proportional sharding puts each trainable element: units, slices and pieces, as
pure values, and the bytes a rank holds (`state_bytes`, the memory model's exact part).

The trainable parameters are laid out flat, unit by unit: the root unit first (the
parameters outside every block), then each block (`autobatch.step.shard.repeated_blocks`,
the units FSDP2's "full" shards), each unit's parameters in `parameters()` order. Rank r
owns the contiguous range [start_r, start_r + size_r) of that layout (`Slices`; size_r may
be 0). A unit is gathered whole when it runs, from the owners its range meets; a rank
keeps its range as pieces, one per unit its range meets (the optimizer's temporaries:
see `state_bytes`).

Why one range per rank, not each unit split by the shares: the bytes a rank holds are the
same (its slice, and the gathered units), and a unit then has only the owners whose
ranges meet it (usually one or two), not W: fewer collectives per unit, and the
checkpoint's gather stays one contiguous range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autobatch.errors import PlanError

ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, each the size of the piece
ADAM_STEP_BYTES = 4  # AdamW's `step`: a float32 scalar per parameter (here: per piece)


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


@dataclass(frozen=True)
class Piece:
    """The part of one unit a rank owns: elements [start, start + size) of the layout."""

    unit: int
    start: int
    size: int


@dataclass(frozen=True)
class Layout:
    """The flat layout: per parameter (in layout order) its size and unit; the slices."""

    param_sizes: tuple[int, ...]
    param_units: tuple[int, ...]  # non-decreasing from 0: unit 0 is the root
    slices: Slices

    def __post_init__(self) -> None:
        units = self.param_units
        if len(units) != len(self.param_sizes) or list(units) != sorted(units):
            raise PlanError("a layout's parameters come unit by unit, one unit each")
        if self.slices.total != sum(self.param_sizes):
            raise PlanError(
                f"slice sizes {list(self.slices.sizes)} must sum to the model's "
                f"{sum(self.param_sizes)} trainable elements"
            )

    @property
    def total(self) -> int:
        return self.slices.total

    @property
    def n_units(self) -> int:
        return max(self.param_units, default=-1) + 1

    def param_start(self, i: int) -> int:
        return sum(self.param_sizes[:i])

    def unit_bounds(self, u: int) -> tuple[int, int]:
        """The unit's range in the layout (a root without trainable parameters is empty)."""
        idx = [i for i, v in enumerate(self.param_units) if v == u]
        if not idx:
            start = sum(s for s, v in zip(self.param_sizes, self.param_units) if v < u)
            return start, start
        return self.param_start(idx[0]), self.param_start(idx[-1] + 1)

    def unit_size(self, u: int) -> int:
        lo, hi = self.unit_bounds(u)
        return hi - lo

    def owners(self, u: int) -> list[tuple[int, int, int]]:
        """(owner, lo, hi): the non-empty parts of unit u by owner, in rank order."""
        ulo, uhi = self.unit_bounds(u)
        out = []
        for r in range(len(self.slices.sizes)):
            lo, hi = self.slices.bounds(r)
            lo, hi = max(lo, ulo), min(hi, uhi)
            if lo < hi:
                out.append((r, lo, hi))
        return out

    def pieces(self, rank: int) -> list[Piece]:
        """The rank's range cut at unit boundaries, in layout order."""
        lo, hi = self.slices.bounds(rank)
        out = []
        for u in range(self.n_units):
            ulo, uhi = self.unit_bounds(u)
            a, b = max(lo, ulo), min(hi, uhi)
            if a < b:
                out.append(Piece(u, a, b - a))
        return out

    def gathered_elems(self) -> int:
        """The most gathered at once: the root (whole micro-step) and the largest block."""
        blocks = [self.unit_size(u) for u in range(1, self.n_units)]
        return self.unit_size(0) + max(blocks, default=0)


def state_bytes(layout: Layout, rank: int, element_size: int, *, stepped: bool = True) -> dict:
    """What a rank holds at its peak, by part (bytes; s = its slice's elements, e = the
    element size, R = the root unit's elements, U = the largest block's):

    slice           its pieces                                       s e
    slice_grad      their gradients (from the first micro-step on)   s e
    optimizer       AdamW's two states, and a step per piece (a      2 s e + 4 per piece
                    unit its range meets)                             (once stepped)
    gathered        the root's parameters (the whole micro-step) and  (R + U) e
                    the largest block's (in its forward, again in its backward)
    gathered_grads  their gradients (the root's for the micro-step,  (R + U) e
                    a block's from its backward until its reduce)

    The peak is in a micro-step, at the end of the largest block's backward (its
    gradient complete, not yet reduced); between steps a rank holds slice and optimizer
    only. Not here: the optimizer step's temporaries. Without foreach (CPU) AdamW steps
    piece by piece, two copies of the largest piece, below the gathered part; foreach
    AdamW (CUDA's default) takes one more copy of the slice, s e, which exceeds a
    micro-step's peak on a rank with a large slice (the planner counts it:
    `autobatch.planning.proportional.step_peak_bytes`). Activations are the model's own
    (the replica's lines)."""
    s, e = layout.slices.sizes[rank], element_size
    gathered = layout.gathered_elems() * e
    pieces = len(layout.pieces(rank))
    return {
        "slice": s * e,
        "slice_grad": s * e,
        "optimizer": ADAM_STATES * s * e + ADAM_STEP_BYTES * pieces if stepped else 0,
        "gathered": gathered,
        "gathered_grads": gathered,
    }
