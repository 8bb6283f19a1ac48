"""Closed-loop balance: a plan corrected from what its ranks measured. Values in, values out.

Each rank times the compute of its micro-steps (forward and backward, not the wait at
the gradient all-reduce) and knows what its plan predicted for the same micro-batches.
Over a window of steps the ranks share these pairs; from the same shared numbers every
rank computes the same `Proposal`:

1. each rank's speed ratio: the median over the window's steps of measured / predicted
   compute (a median: one step slowed by a page fault or a garbage collection does not
   move it; half the window must agree);
2. each rank's time line refitted: the `fixed_s` and `per_sample_s` of its device's
   capacity scaled by that ratio. A rank runs one shape (its micro-batches differ by at
   most one sample), so it sees one point of its line: the level is the measured one,
   the split between fixed and per-sample cost stays the probe's. The memory figures are
   not touched: a new plan never asks for a micro-batch the probe did not show fits;
3. the plan made again with `make_plan` on the refitted capacities: the same global
   batch, the same ranks in the same order (`keep_all`: a running process group cannot
   shrink), the same sharding (under "full" every rank keeps the same micro-step count;
   under "proportional" the plan stays: its slices are fixed while the ranks run);
4. `switch` when the refitted time lines predict the new plan's step shorter than the
   current plan's by more than `threshold` (relative), and so do the time lines refitted
   from each single step of the window, all but one step in four (`outliers`): sustained,
   so a load that came and went within the window does not switch, while one step
   disturbed on some rank does not veto a real change. A hysteresis: a plan that is
   right (ratios near 1, or all alike) is never replaced, and two plans never alternate.

The refitted capacities become the new plan's inputs: the next window's ratios are
measured against them, and are near 1 once the plan fits the devices again.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from autobatch.errors import PlanError
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.plan import Plan
from autobatch.planning.planner import make_plan

DEFAULT_WINDOW = 5  # optimizer steps per decision
DEFAULT_THRESHOLD = 0.1  # the least relative gain in predicted step time that switches
NOTE = "rebalanced:"  # the plan note a rebalance adds (the latest one is kept)


@dataclass(frozen=True)
class Proposal:
    """What the window's measurements say about the plan, and the plan they suggest."""

    ratios: tuple[float, ...]  # per rank: measured / predicted compute, median over the window
    before_s: float  # the current plan's step, predicted with the refitted time lines
    after_s: float  # the new plan's step, predicted with the refitted time lines
    plan: Plan  # the new plan: the refitted capacities are its inputs
    threshold: float
    step_gains: tuple[float, ...] = ()  # the gain predicted from each step of the window

    @property
    def gain(self) -> float:
        """The relative step time the new plan saves (negative: it would be slower)."""
        return 1.0 - self.after_s / self.before_s

    @property
    def outliers(self) -> int:
        """The window's steps whose own gain may miss the threshold: one in four."""
        return len(self.step_gains) // 4

    @property
    def switch(self) -> bool:
        """The gain beats the threshold over the window, and in all of its steps but
        `outliers`."""
        missed = sum(g <= self.threshold for g in self.step_gains)
        return self.gain > self.threshold and missed <= self.outliers


def step_ratios(
    measured: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]]
) -> tuple[tuple[float, ...], ...]:
    """Per step of the window, per rank: measured / predicted compute.

    `measured[r][i]` and `predicted[r][i]` are rank r's compute in the window's step i, in
    seconds. A PlanError when the ranks' windows differ in length or are empty, or hold a
    time that is not finite and > 0."""
    if len(measured) != len(predicted) or not measured:
        raise PlanError(f"{len(measured)} ranks measured, {len(predicted)} predicted")
    steps = len(measured[0])
    for rank, (got, want) in enumerate(zip(measured, predicted)):
        if not got or len(got) != steps or len(want) != steps:
            raise PlanError(
                f"rank {rank}: {len(got)} measured and {len(want)} predicted steps; every "
                f"rank's window needs the same number (at least one) of each, here {steps}"
            )
        bad = [t for t in (*got, *want) if not (math.isfinite(t) and t > 0)]
        if bad:
            raise PlanError(f"rank {rank}: compute times {bad[:3]} must be finite and > 0 s")
    return tuple(
        tuple(got[i] / want[i] for got, want in zip(measured, predicted)) for i in range(steps)
    )


def speed_ratios(
    measured: Sequence[Sequence[float]], predicted: Sequence[Sequence[float]]
) -> tuple[float, ...]:
    """Per rank, the median over the window's steps of measured / predicted compute (see
    `step_ratios`)."""
    return _medians(step_ratios(measured, predicted))


def _medians(per_step: Sequence[Sequence[float]]) -> tuple[float, ...]:
    return tuple(statistics.median(column) for column in zip(*per_step))


def refit(plan: Plan, ratios: Sequence[float]) -> tuple[DeviceCapacity, ...]:
    """Each rank's device with its time line scaled by its ratio, in the plan's rank order;
    its memory figures (largest micro-batch, memory model) unchanged."""
    if len(ratios) != plan.world_size:
        raise PlanError(f"{len(ratios)} ratios for a plan of {plan.world_size} ranks")
    return tuple(
        replace(
            plan.capacity(r.rank),
            fixed_s=plan.capacity(r.rank).fixed_s * ratio,
            per_sample_s=plan.capacity(r.rank).per_sample_s * ratio,
        )
        for r, ratio in zip(plan.ranks, ratios)
    )


def step_time(plan: Plan, capacities: Sequence[DeviceCapacity]) -> float:
    """The plan's step (its slowest rank) predicted with `capacities` (in rank order)."""
    return max(d.time_of(r.micro_batches) for r, d in zip(plan.ranks, capacities))


def propose(
    plan: Plan,
    measured: Sequence[Sequence[float]],
    predicted: Sequence[Sequence[float]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> Proposal:
    """The plan the window's measurements suggest (see the module's docstring); deterministic:
    ranks that give the same numbers get equal proposals."""
    if not (math.isfinite(threshold) and 0 < threshold < 1):
        raise PlanError(f"threshold={threshold!r} must be between 0 and 1 (a relative gain)")
    per_step = step_ratios(measured, predicted)
    ratios = _medians(per_step)
    capacities = refit(plan, ratios)
    if plan.sharding == "proportional":  # the ranks' slices are fixed until a restart:
        new = plan  # a new joint plan would move them (not built: no switch)
    else:
        new = make_plan(plan.global_batch_size, capacities, keep_all=True, sharding=plan.sharding)
    devices = [r.device_id for r in plan.ranks]
    if [r.device_id for r in new.ranks] != devices:
        raise PlanError(f"a rebalanced plan keeps every rank on its device, in order: {devices}")
    kept = [n for n in plan.notes if not n.startswith(NOTE)]
    notes = (*kept, *(n for n in new.notes if n not in kept), _note(ratios))
    new = replace(new, notes=notes)
    step_gains = tuple(_gain(plan, new, refit(plan, r)) for r in per_step)
    before, after = step_time(plan, capacities), step_time(new, capacities)
    return Proposal(ratios, before, after, new, threshold, step_gains)


def _gain(old: Plan, new: Plan, capacities: Sequence[DeviceCapacity]) -> float:
    """The relative step time `new` saves over `old`, both predicted with `capacities`."""
    return 1.0 - step_time(new, capacities) / step_time(old, capacities)


def _note(ratios: Sequence[float]) -> str:
    said = ", ".join(f"rank {r} x{ratio:.2f}" for r, ratio in enumerate(ratios))
    return f"{NOTE} time lines refitted from the ranks' measured compute ({said})"
