"""The replica solver: the fastest split of a global batch when each rank runs its own
number of micro-steps, and the plan assembled from it.

The time of a rank that processes s samples per optimizer step in
k = ceil(s / m) near-equal micro-batches is

    T(s) = step_overhead + k * fixed + per_sample * s        (T(0) = 0: left out)

T is non-decreasing in s, so "can every rank finish within T?" is monotone in
T: binary search the smallest feasible T, then hand out exactly B samples.

    plan_replicas       make_plan for replicas (the "none" sharding mode)
    optimal_samples     samples per device minimising the slowest device's step time
    assemble            a Plan from samples per device (near-equal micro-batches)
    equal_split_plan    today's DDP recipe: an equal share per device
    check_inputs, cannot_fit_message, rank_plan, split_evenly: shared with the
    sharded planner (autobatch.planning.sharded), which plans "optimizer" sharding
    with this solver at the world size it includes.

Pure values: imports numpy, autobatch.errors, autobatch.levers and planning's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from autobatch.errors import PlanError
from autobatch.levers import Sharding
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.plan import Baseline, ExcludedDevice, Plan, RankPlan, size_text


def split_evenly(samples: int, max_micro_batch: int) -> tuple[int, ...]:
    """`samples` as the fewest micro-batches <= max_micro_batch, sizes differing by <= 1."""
    k = _ceil_div(samples, max_micro_batch)
    base, extra = divmod(samples, k)
    return (base + 1,) * extra + (base,) * (k - extra)


def check_inputs(
    global_batch_size: int, devices: Sequence[DeviceCapacity], *, each_must_fit: bool | None = True
) -> None:
    """PlanError on a bad batch size or device list; `each_must_fit`: every device must
    fit one sample (False: at least one; None: not checked here)."""
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise PlanError(f"global_batch_size={global_batch_size!r} must be an integer >= 1")
    if global_batch_size < 1:
        raise PlanError(f"global_batch_size={global_batch_size} must be >= 1")
    if not devices:
        raise PlanError("no devices to plan for: give at least one device")
    seen: set[str] = set()
    for d in devices:
        if d.device_id in seen:
            raise PlanError(f"device_id {d.device_id!r} appears twice; device ids must be unique")
        seen.add(d.device_id)
    unfit = [d for d in devices if d.max_micro_batch < 1]
    if each_must_fit is None:
        return
    if unfit and (each_must_fit or len(unfit) == len(devices)):
        raise PlanError("; ".join(cannot_fit_message(d) for d in unfit))


def cannot_fit_message(d: DeviceCapacity) -> str:
    msg = f"device {d.device_id!r} ({d.name}) cannot fit even one sample"
    of = f" of its {size_text(d.memory_bytes)}" if d.memory_bytes else ""
    if d.memory is not None:  # the profile's model: the same budget and peak the probe used
        budget = d.memory.budget(d.sharding)
        need = d.memory.peak_bytes(1, d.sharding, d.world_size or 1)
        if need > budget:
            budget_text = size_text(budget)
            msg += f": it needs {size_text(need)} for one sample, its budget is {budget_text}{of}"
        else:
            msg += f": micro-batch 1 ran out of memory when measured (predicted {size_text(need)})"
    elif d.memory_bytes is not None and d.peak_fixed_bytes is not None:
        need = d.predicted_peak_bytes(1)
        has = size_text(d.memory_bytes)
        msg += f": it has {has} for training, one sample needs {size_text(need)}"
    return msg + (
        "; remove it from the job, shard the model (sharding: optimizer or full), turn on "
        "gradient checkpointing, or lower the sequence length / precision"
    )


def plan_replicas(
    global_batch_size: int,
    devices: Sequence[DeviceCapacity],
    *,
    baseline: bool = True,
    keep_all: bool = False,
) -> Plan:
    """`make_plan` for replicas ("none"; every capacity as a replica's): the plan that
    minimises the slowest rank's predicted step time, devices that fit no sample left out
    with that reason."""
    check_inputs(global_batch_size, devices, each_must_fit=keep_all)
    fit = [d for d in devices if d.max_micro_batch >= 1]
    if keep_all:
        plan = _plan_keeping_all(global_batch_size, fit, baseline=baseline)
    else:
        samples = optimal_samples(global_batch_size, fit)
        plan = assemble(global_batch_size, fit, samples, baseline=baseline)
    if len(fit) == len(devices):
        return plan
    unfit = [
        ExcludedDevice(d.device_id, d.name, cannot_fit_message(d))
        for d in devices
        if d.max_micro_batch < 1
    ]
    return replace(plan, excluded=(*plan.excluded, *unfit), inputs=tuple(devices))


class _Fleet:
    """The devices as arrays, for the vectorised capacity search."""

    def __init__(self, devices: Sequence[DeviceCapacity], global_batch_size: int):
        self.B = global_batch_size
        self.m = np.array([d.max_micro_batch for d in devices], dtype=np.int64)
        self.a = np.array([d.fixed_s for d in devices], dtype=np.float64)
        self.c = np.array([d.per_sample_s for d in devices], dtype=np.float64)
        self.o = np.array([d.step_overhead_s for d in devices], dtype=np.float64)

    def time(self, s: np.ndarray) -> np.ndarray:
        k = -(-s // self.m)
        t = self.o + k * self.a + self.c * s
        return np.where(s > 0, t, 0.0)

    def capacity(self, T: float) -> np.ndarray:
        """Per device, the most samples (at most B) it can do in one step of at most T
        seconds. A binary search on the step time itself, which never falls as a device's
        samples grow: exact where a closed form rounds (a per-sample cost of 0, a fixed
        cost lost beside the step overhead)."""
        fits = np.zeros_like(self.m)  # time(0) = 0 <= T
        over = np.full_like(self.m, self.B + 1)  # never timed: mid < over
        while np.any(over - fits > 1):
            mid = (fits + over) // 2
            ok = self.time(mid) <= T
            fits, over = np.where(ok, mid, fits), np.where(ok, over, mid)
        return fits


def _plan_keeping_all(B: int, devices: Sequence[DeviceCapacity], *, baseline: bool) -> Plan:
    if len(devices) > B:
        raise PlanError(
            f"global_batch_size={B} is smaller than the {len(devices)} devices that must each "
            "take at least one sample"
        )
    return assemble(B, devices, optimal_samples(B, devices, at_least=1), baseline=baseline)


def optimal_samples(
    global_batch_size: int, devices: Sequence[DeviceCapacity], *, at_least: int = 0
) -> np.ndarray:
    """Samples per device that minimise the slowest device's step time, each device
    taking at least `at_least` samples (binary search on the step time)."""
    fleet = _Fleet(devices, global_batch_size)

    def capacity(T: float) -> np.ndarray:
        return np.maximum(fleet.capacity(T), at_least)

    lo, hi = 0.0, float(min(d.rank_time(global_batch_size) for d in devices))
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if capacity(mid).sum() >= global_batch_size:
            hi = mid
        else:
            lo = mid
    return _fill(capacity(lo), capacity(hi), global_batch_size)


def _fill(floor_s: np.ndarray, ceil_s: np.ndarray, B: int) -> np.ndarray:
    """Start from what every device does within the infeasible bound, then water-fill
    the deficit over the devices that can do more within the feasible bound."""
    s = floor_s.copy()
    deficit = B - int(s.sum())
    room = ceil_s - s
    while deficit > 0:
        open_ = np.flatnonzero(room > 0)
        assert len(open_), "the feasible bound must cover the global batch"
        share = max(1, deficit // len(open_))
        give = np.minimum(room[open_], share)
        if give.sum() > deficit:  # last round: one each, in device order
            give = np.minimum(give, 1)
            give[np.cumsum(give) > deficit] = 0
        s[open_] += give
        room[open_] -= give
        deficit -= int(give.sum())
    return s


def assemble(
    B: int,
    devices: Sequence[DeviceCapacity],
    samples: np.ndarray,
    *,
    baseline: bool,
    sharding: Sharding = "none",
) -> Plan:
    ranks, excluded = [], []
    step_time = max(d.rank_time(int(s)) for d, s in zip(devices, samples))
    for d, s in zip(devices, samples):
        s = int(s)
        if s == 0:
            excluded.append(ExcludedDevice(d.device_id, d.name, _exclusion_reason(d, step_time)))
            continue
        mbs = split_evenly(s, d.max_micro_batch)
        ranks.append(rank_plan(len(ranks), d, mbs, d.rank_time(s)))
    return Plan(
        global_batch_size=B,
        ranks=tuple(ranks),
        predicted_step_time_s=step_time,
        ideal_samples_per_s=sum(d.best_samples_per_s(B) for d in devices),
        baseline=equal_split_baseline(B, devices) if baseline else None,
        excluded=tuple(excluded),
        inputs=tuple(devices),
        sharding=sharding,
    )


def _exclusion_reason(d: DeviceCapacity, step_time: float) -> str:
    one = d.rank_time(1)
    if one > step_time:
        return (
            f"even one sample takes {one * 1e3:.2f} ms (fixed {d.fixed_s * 1e3:.2f} ms per "
            f"micro-step + {d.step_overhead_s * 1e3:.2f} ms per step), longer than the "
            f"{step_time * 1e3:.2f} ms the other devices need for the whole batch"
        )
    return "not needed: the other devices finish the global batch in the same step time"


def equal_split_plan(global_batch_size: int, devices: Sequence[DeviceCapacity]) -> Plan:
    """Today's DDP recipe as a runnable plan: every device gets an equal share of the
    global batch, in micro-batches no larger than the smallest device's limit, with the
    same accumulation count everywhere (shares differ by at most one sample)."""
    check_inputs(global_batch_size, devices)
    n = min(len(devices), global_batch_size)
    used = devices[:n]
    micro = min(d.max_micro_batch for d in used)
    accum = _ceil_div(_ceil_div(global_batch_size, n), micro)
    ranks = []
    for i, d in enumerate(used):
        share = global_batch_size // n + (1 if i < global_batch_size % n else 0)
        base, extra = divmod(share, accum)
        mbs = tuple(x for x in (base + 1,) * extra + (base,) * (accum - extra) if x > 0)
        ranks.append(rank_plan(i, d, mbs, d.time_of(mbs)))
    excluded = tuple(
        ExcludedDevice(d.device_id, d.name, "fewer samples than devices") for d in devices[n:]
    )
    modes = {d.sharding for d in used}
    if len(modes) > 1:
        raise PlanError(f"devices planned with different sharding modes: {sorted(modes)}")
    return Plan(
        global_batch_size=global_batch_size,
        ranks=tuple(ranks),
        predicted_step_time_s=max(r.predicted_time_s for r in ranks),
        ideal_samples_per_s=sum(d.best_samples_per_s(global_batch_size) for d in devices),
        baseline=None,
        excluded=excluded,
        inputs=tuple(devices),
        sharding=modes.pop(),
    )


def equal_split_baseline(global_batch_size: int, devices: Sequence[DeviceCapacity]) -> Baseline:
    """The equal split's figures, with each device's limits as given (sharded or not; its
    shares may differ by a micro-step, which a figure, unlike a full-sharding plan, allows)."""
    figures = [replace(d, sharding="none", world_size=None) for d in devices]
    eq = equal_split_plan(global_batch_size, figures)
    return Baseline(
        micro_batch_size=max(r.micro_batch_size for r in eq.ranks),
        accumulation_steps=max(r.accumulation_steps for r in eq.ranks),
        step_time_s=eq.predicted_step_time_s,
        samples_per_s=eq.predicted_samples_per_s,
    )


def rank_plan(
    rank: int, d: DeviceCapacity, micro_batches: tuple[int, ...], time_s: float
) -> RankPlan:
    return RankPlan(
        rank=rank,
        device_id=d.device_id,
        device_name=d.name,
        micro_batches=micro_batches,
        max_micro_batch=d.max_micro_batch,
        predicted_time_s=time_s,
        predicted_peak_bytes=d.predicted_peak_bytes(max(micro_batches)),
        state_bytes=d.state_bytes(),
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
