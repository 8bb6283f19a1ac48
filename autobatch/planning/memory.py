"""A rank's memory by sharding mode and world size: what sharding buys, as a pure model.

A probe measures one full replica on one device: peak(b), the peak of a training
step at micro-batch b, as the max of lines (`PeakLine`): the micro-steps' lines
(forward + backward, with the gradients of earlier micro-steps alive) and the
optimizer step's line. It also counts the model's state, a replica's bytes of

    P  parameters         G  gradients (trainable parameters)
    O  optimizer state    S = P + G + O
    U  the largest block's parameters (a unit: one `fully_shard`ed block)
    R  the root unit's parameters (those outside every block)

With W ranks, FSDP2 (`torch.distributed.fsdp.fully_shard`; here the step's
`autobatch.step.shard.Sharded`, its blocks `repeated_blocks`) keeps 1/W of each
parameter, gradient and optimizer state tensor on each rank and all-gathers
parameters when a unit runs. A rank's peak, from the replica's lines:

none       DDP: every rank holds a replica, and DDP's gradient buckets (a reserve
           outside the lines).
               micro(b)                               opt(b)
optimizer  `fully_shard(reshard_after_forward=False)`; per micro-step
           `set_requires_gradient_sync(last)`, `set_reshard_after_backward(last)`.
           The first forward all-gathers every unit: P unsharded, alive until the
           last backward, next to the rank's own P/W. Gradients accumulate
           unsharded (G) until the last backward reduce-scatters them (G/W).
           The optimizer steps on shards only. Ranks may run different numbers
           of micro-steps (one all-gather, one reduce-scatter per step).
               micro(b) - O (1 - 1/W) + P/W           opt(b) / W
full       `fully_shard(reshard_after_forward=True)`, gradients reduce-scattered
           in every micro-step: every forward and backward all-gathers each unit
           again, so every rank must run the same number of micro-steps. A rank
           holds S/W, plus what is gathered at once: the root's parameters (FSDP2
           keeps the root unsharded from its forward to the end of backward), and
           of the unit at work its unsharded parameters, its unsharded gradients
           and the reduce-scatter input, plus the next unit's prefetched all-gather.
               micro(b) - S (1 - 1/W) + R + 4 U       opt(b) / W

proportional  `autobatch.step.proportional`: the trainable parameters (G bytes) laid out
           flat unit by unit (the root, then the blocks "full" shards) and split
           into contiguous slices, of sizes the plan chooses, one per rank. A
           micro-step gathers the root for its whole length and each block only
           while it runs (forward, then again for its backward), each with its
           gradient: at most the root and the largest block at once, 2 (R + U),
           beside the rank's slice, its gradient and its AdamW state
           (`state_bytes` there); frozen parameters (P - G) stay whole. With even
           slices (this term; `plan_proportional` sizes them per device):
               micro(b) - S + (P - G) + 2 (R + U) + ceil((2 G + O) / W)   opt(b) / W
           (R + U at most G; G when the units are unknown: one flat unit.)

On one rank `Sharded` leaves the model unwrapped: every mode is a replica there.
opt(b) / W: the optimizer step's bytes are parameters, gradients, state and the
optimizer's temporaries per parameter, all sharded. Sharded modes need no DDP
buckets: that reserve (`MemoryModel.replica_reserve_bytes`) returns to the budget.
Activations are taken from the replica's lines unchanged (an upper bound: FSDP2
frees parameters earlier, so its activation peak is no higher).

Checked against torch's FSDPMemTracker (FSDP2 on a fake process group, a 16 MiB
GPT, AdamW foreach, two micro-steps): "optimizer" matched to 0.01 MiB at W = 2, 4,
8 and b = 1, 4, 16; "full" was 2-24 % above the tracked peak (never below; with
3 U instead of 4 U it fell below at W = 2, b = 1); tests/test_sharded_plan.py
repeats this from a measured profile through `Sharded`. The CUDA context, NCCL and
the allocator's fragmentation stay in the profile's reserve, as for a replica.

Each lever is one term (`Term`): what its setting does to a replica's lines on one
rank. Sharding's four terms are `SHARDING_TERMS`, one function per mode.

Pure values: imports autobatch.errors and autobatch.levers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from autobatch.errors import PlanError
from autobatch.levers import SHARDINGS as SHARDINGS  # the planner's modules read them here too
from autobatch.levers import Sharding, check_sharding

FULL_GATHERED_UNITS = 4  # the unit at work (parameters, gradients, reduce-scatter) + the next


@dataclass(frozen=True)
class PeakLine:
    """peak(b) = fixed_bytes + per_sample_bytes * b."""

    fixed_bytes: float
    per_sample_bytes: float

    def at(self, b: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * b

    def largest_under(self, budget: float, cap: int) -> int:
        """Largest b in [0, cap] with at(b) <= budget."""
        if self.per_sample_bytes <= 0:
            return cap if self.fixed_bytes <= budget else 0
        return max(0, min(cap, math.floor((budget - self.fixed_bytes) / self.per_sample_bytes)))

    @classmethod
    def through(cls, p: tuple[int, float], q: tuple[int, float]) -> PeakLine:
        (b1, p1), (b2, p2) = p, q
        slope = (p2 - p1) / (b2 - b1)
        return cls(p2 - slope * b2, slope)


def largest_under(lines: tuple[PeakLine, ...], budget: float, cap: int) -> int:
    """Largest b in [0, cap] whose peak (the max of the lines) is within budget."""
    return min(line.largest_under(budget, cap) for line in lines)


def peak_at(lines: tuple[PeakLine, ...], b: int) -> int:
    return math.ceil(max(line.at(b) for line in lines))


@dataclass(frozen=True)
class ModelState:
    """A replica's parameters, gradients and optimizer state, and its sharding units (bytes)."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    largest_unit_bytes: int = 0  # U: the largest fully_shard'ed block's parameters
    root_unit_bytes: int = 0  # R: parameters outside every block (the root unit)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PlanError(f"ModelState.{name}={value!r} must be an integer >= 0")

    @property
    def total_bytes(self) -> int:
        """S: what a replica holds."""
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    def per_rank(self, sharding: Sharding, world_size: int) -> int:
        """Bytes of state a rank holds during its micro-steps (the peak's non-activation part)."""
        return self.total_bytes + sharding_term(self, sharding, world_size).micro_bytes


# ---------------------------------------------------------------------------
# the levers' terms


@dataclass(frozen=True)
class Term:
    """What one lever's setting does to a rank's peak, relative to a replica's."""

    micro_bytes: int = 0  # every micro-step's line moves by this (state held meanwhile)
    optimizer_divisor: int = 1  # the optimizer step's line is divided by this (state sharded)
    frees_replica_reserve: bool = False  # no DDP buckets: their reserve returns to the budget

    @property
    def changes_nothing(self) -> bool:
        """The replica's lines and budget stand (and so its measured largest micro-batch)."""
        return self == Term()


def _replica(state: ModelState, world_size: int) -> Term:
    """ "none": DDP, a replica on every rank, and DDP's gradient buckets in the reserve."""
    return Term()


def _optimizer_sharded(state: ModelState, world_size: int) -> Term:
    """ "optimizer": P gathered next to the rank's P/W, G whole, O/W; the optimizer step on
    shards."""
    W = world_size
    if W == 1:  # one rank: `Sharded` leaves the model as it is
        return Term(frees_replica_reserve=True)
    opt, params = state.optimizer_bytes, state.params_bytes
    return Term(-opt + _ceil_div(opt + params, W), W, frees_replica_reserve=True)


def _fully_sharded(state: ModelState, world_size: int) -> Term:
    """ "full": S/W, plus the root unit and the units gathered at once."""
    W = world_size
    if W == 1:
        return Term(frees_replica_reserve=True)
    S = state.total_bytes
    gathered = state.root_unit_bytes + FULL_GATHERED_UNITS * state.largest_unit_bytes
    return Term(-S + _ceil_div(S, W) + gathered, W, frees_replica_reserve=True)


def _proportional(state: ModelState, world_size: int) -> Term:
    """ "proportional" with even slices: the root and the largest block gathered with their
    gradients (2 (R + U), the transients of `autobatch.step.proportional.state_bytes`),
    frozen parameters whole, and 1/W of the slice, its gradient and its optimizer state."""
    W = world_size
    if W == 1:  # one rank: `Proportional` leaves the model as it is
        return Term(frees_replica_reserve=True)
    grads, opt = state.grads_bytes, state.optimizer_bytes
    held = (state.params_bytes - grads) + 2 * proportional_gathered_bytes(state)
    held += _ceil_div(2 * grads + opt, W)
    return Term(held - state.total_bytes, W, frees_replica_reserve=True)


def proportional_gathered_bytes(state: ModelState) -> int:
    """Under "proportional", the most trainable parameter bytes gathered at once: the root
    unit and the largest block (R + U; at most G), or G when the units are not known."""
    units = state.root_unit_bytes + state.largest_unit_bytes
    return min(units, state.grads_bytes) if units else state.grads_bytes


SHARDING_TERMS: dict[Sharding, Callable[[ModelState, int], Term]] = {
    "none": _replica,
    "optimizer": _optimizer_sharded,
    "full": _fully_sharded,
    "proportional": _proportional,
}


def sharding_term(state: ModelState, sharding: Sharding, world_size: int) -> Term:
    """The sharding lever's term for `sharding` over `world_size` ranks."""
    return SHARDING_TERMS[check_sharding(sharding)](state, check_world_size(world_size))


# ---------------------------------------------------------------------------
# one device's memory


@dataclass(frozen=True)
class MemoryFit:
    """What fits one rank for a sharding mode and world size: the planner's memory view."""

    max_micro_batch: int
    peak_fixed_bytes: int  # a line never below peak(b) over [1, max_micro_batch]
    peak_per_sample_bytes: int
    state_bytes: int  # `ModelState.per_rank`


@dataclass(frozen=True)
class MemoryModel:
    """One device's memory for one job, for any sharding mode and world size.

    Made from a probe's profile: the replica's budget, its peak lines (micro-steps
    and optimizer step apart), the model's state, and the replica's largest
    micro-batch (measured: "none" returns it unchanged). `cap` bounds what a
    sharded prediction may reach (those sizes were not run on the device).
    """

    budget_bytes: int
    micro_lines: tuple[PeakLine, ...]
    optimizer_line: PeakLine
    state: ModelState
    max_micro_batch: int
    cap: int
    replica_reserve_bytes: int = 0  # DDP's gradient buckets: part of the reserve, replica only

    def __post_init__(self) -> None:
        if not self.micro_lines:
            raise PlanError("MemoryModel needs at least one micro-step peak line")
        if self.cap < self.max_micro_batch:
            raise PlanError(f"MemoryModel cap={self.cap} is below max_micro_batch")

    def term(self, sharding: Sharding = "none", world_size: int = 1) -> Term:
        """What the levers' settings do to the replica's lines (today one lever: sharding)."""
        return sharding_term(self.state, sharding, world_size)

    def budget(self, sharding: Sharding, world_size: int = 1) -> int:
        """The largest allowed peak: sharded modes have no DDP buckets to reserve."""
        freed = self.term(sharding, world_size).frees_replica_reserve
        return self.budget_bytes + (self.replica_reserve_bytes if freed else 0)

    def lines(self, sharding: Sharding = "none", world_size: int = 1) -> tuple[PeakLine, ...]:
        """peak(b) for one rank = the max of these lines."""
        term = self.term(sharding, world_size)
        if term.changes_nothing:
            return (*self.micro_lines, self.optimizer_line)
        micro = tuple(
            PeakLine(x.fixed_bytes + term.micro_bytes, x.per_sample_bytes) for x in self.micro_lines
        )
        opt, n = self.optimizer_line, term.optimizer_divisor
        return (*micro, PeakLine(opt.fixed_bytes / n, opt.per_sample_bytes / n))

    def peak_bytes(self, b: int, sharding: Sharding = "none", world_size: int = 1) -> int:
        """Predicted peak of one rank's training step at micro-batch b."""
        return peak_at(self.lines(sharding, world_size), b)

    def fit(self, sharding: Sharding = "none", world_size: int = 1) -> MemoryFit:
        """The largest micro-batch that fits one rank, and the peak line over [1, it]."""
        lines = self.lines(sharding, world_size)
        if self.term(sharding, world_size).changes_nothing:
            m = self.max_micro_batch  # measured
        else:
            m = largest_under(lines, self.budget(sharding, world_size), self.cap)
        top = max(m, 2)  # the chord over [1, top]; a flat line when only b = 1 fits
        per = 0 if m == 1 else math.ceil((peak_at(lines, top) - peak_at(lines, 1)) / (top - 1))
        return MemoryFit(
            max_micro_batch=m,
            peak_fixed_bytes=peak_at(lines, 1) - per,
            peak_per_sample_bytes=per,
            state_bytes=self.state.per_rank(sharding, world_size),
        )

    @classmethod
    def from_dict(cls, data: dict) -> MemoryModel:
        return cls(
            **{
                **data,
                "micro_lines": tuple(PeakLine(**x) for x in data["micro_lines"]),
                "optimizer_line": PeakLine(**data["optimizer_line"]),
                "state": ModelState(**data["state"]),
            }
        )


def check_world_size(world_size: int) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world_size={world_size!r} must be an integer >= 1")
    return world_size


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
