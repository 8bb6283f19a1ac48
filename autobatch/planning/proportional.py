"""The joint plan of memory-proportional sharding: per device, its slice of the model's
state and its micro-batch size, chosen together.

Under proportional sharding (autobatch.step.proportional) device r holds, at the peak
of a micro-step, the root unit and the largest block gathered with their gradients
(2 g e bytes, g = R + U elements, the same on every rank; g = P for one flat unit), its
slice of s_r elements with the slice's gradient and AdamW's two states (4 s_r e, plus
AdamW's 4-byte step per piece, at most one per unit: n 4 [s_r > 0] bytes,
`state_bytes`), and the activations of its micro-batch b_r. So under its memory M_r

    fixed_r + 2 g e + per_sample_r * b_r + 4 e s_r + 4 n [s_r > 0]  <=  M_r

and the slices must cover the model: sum s_r = P. Every rank runs the same number k of
micro-steps (each gathers); rank r's n_r samples (k <= n_r <= k b_r, micro-batches of
ceil or floor n_r / k) take o_r + k a_r + c_r n_r seconds. The plan minimises the
slowest rank's time (ties: the fewest micro-steps) with sum n_r = B exactly.

Memory given to samples is memory taken from state: for a step time T and a k, each
rank can do at most N_r(T) samples; among the choices b_r (n_r = min(k b_r, N_r)) that
cover B samples, a knapsack over the ranks (samples covered -> the most state room)
finds whether the rooms can hold P elements. Feasibility only grows with T, so each k
bisects the sorted step times the ranks can have. The slices then fill each rank's
room in proportion to it. A device may hold no state (s_r = 0).

`make_proportional_plan` feeds it from a probe's figures (each `DeviceCapacity`'s memory
model and time line, the inputs "full"'s equal-steps planner gets) and returns a `Plan`
whose ranks carry their slices (`RankPlan.state_slice`).

Pure values: imports numpy, autobatch.errors and planning's values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from autobatch.errors import PlanError
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.memory import ModelState, proportional_gathered_bytes
from autobatch.planning.plan import ExcludedDevice, Plan, RankPlan, size_text

ADAM_STEP_BYTES = 4  # as autobatch.step.proportional (the planner does not import the step)
SLICE_COPIES = 4  # the slice, its gradient, AdamW's two states


@dataclass(frozen=True)
class ProportionalDevice:
    """One device's budget and models (bytes, seconds)."""

    memory_bytes: int  # what the plan may use
    fixed_bytes: int  # outside the sharded state: activations' intercept, frozen weights
    per_sample_bytes: float  # activations per sample of a micro-batch
    fixed_s: float  # a_r: per micro-step
    per_sample_s: float  # c_r: per sample
    step_overhead_s: float = 0.0  # o_r: per optimizer step
    cap: int | None = None  # the largest micro-batch its figures hold for (None: any)
    step_fixed_bytes: int = 0  # at the optimizer step, outside the slice: frozen weights
    step_temp_bytes: float = 0.0  # the optimizer step's temporaries per slice element


@dataclass(frozen=True)
class ProportionalPlan:
    micro_steps: int  # k, on every rank
    samples: tuple[int, ...]  # n_r, summing to the global batch
    micro_batches: tuple[tuple[int, ...], ...]  # each rank's k micro-batch sizes
    slices: tuple[int, ...]  # s_r, summing to the model's trainable elements
    step_s: float  # the slowest rank's predicted time
    peak_bytes: tuple[int, ...]  # each rank's predicted peak under the model above

    @property
    def shares(self) -> tuple[float, ...]:
        total = sum(self.slices)
        return tuple(s / total for s in self.slices)


@dataclass(frozen=True)
class Units:
    """What a micro-step gathers at once (elements: the root and the largest block) and how
    many units there are (each piece of a slice has AdamW's step); one flat unit: (P, 1)."""

    gathered_elems: int
    count: int = 1


def state_room(
    d: ProportionalDevice, b: int, total_elems: int, element_size: int, units: Units | None = None
) -> int:
    """The most slice elements device `d` holds beside micro-batch `b` (0: none, or -1 when
    even an empty slice does not fit), in its micro-steps and in its optimizer step."""
    units = units or Units(total_elems)
    free = d.memory_bytes - d.fixed_bytes - 2 * units.gathered_elems * element_size
    free -= d.per_sample_bytes * b
    at_step = d.memory_bytes - d.step_fixed_bytes
    if free < 0 or at_step < 0:
        return -1
    steps = ADAM_STEP_BYTES * units.count
    per = SLICE_COPIES * element_size
    beside_micro_batch = math.floor((free - steps) / per)
    beside_step_temps = math.floor((at_step - steps) / (per + d.step_temp_bytes))
    return max(0, min(beside_micro_batch, beside_step_temps))


def peak_bytes(
    d: ProportionalDevice,
    b: int,
    s: int,
    total_elems: int,
    element_size: int,
    units: Units | None = None,
) -> int:
    """Device `d`'s peak at micro-batch `b` with a slice of `s` elements: the larger of a
    micro-step's (the units gathered, the activations) and the optimizer step's."""
    units = units or Units(total_elems)
    gathered = 2 * units.gathered_elems * element_size
    micro_step = (
        d.fixed_bytes + gathered + d.per_sample_bytes * b + _slice_bytes(s, element_size, units)
    )
    return max(math.ceil(micro_step), step_peak_bytes(d, s, element_size, units))


def step_peak_bytes(d: ProportionalDevice, s: int, element_size: int, units: Units) -> int:
    """Device `d`'s peak in the optimizer step with a slice of `s` elements: the slice with
    its gradient and AdamW's state, and the step's temporaries."""
    return math.ceil(
        d.step_fixed_bytes + _slice_bytes(s, element_size, units) + d.step_temp_bytes * s
    )


def _slice_bytes(s: int, element_size: int, units: Units) -> int:
    return SLICE_COPIES * s * element_size + (ADAM_STEP_BYTES * units.count if s else 0)


def plan_proportional(
    global_batch_size: int,
    devices: Sequence[ProportionalDevice],
    total_elems: int,
    element_size: int = 4,
    units: Units | None = None,
) -> ProportionalPlan:
    """The fastest plan (see the module's docstring); PlanError when none fits. `units`:
    one flat unit when not given."""
    B, W = global_batch_size, len(devices)
    units = units or Units(total_elems)
    if W < 1 or B < W:
        raise PlanError(f"global_batch_size={B} must be >= the number of devices ({W})")
    caps = [_largest_b(d, total_elems, element_size, B, units) for d in devices]
    best: tuple[float, int, list[int], list[int]] | None = None
    for k in range(1, B // W + 1):
        if any(k * m < k for m in caps) or sum(k * m for m in caps) < B:
            continue
        floor = max(d.step_overhead_s + k * (d.fixed_s + d.per_sample_s) for d in devices)
        if best is not None and floor > best[0]:
            continue
        found = _best_for_k(B, devices, caps, k, total_elems, element_size, units)
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], k, found[1], found[2])
    if best is None:
        raise PlanError(
            f"no plan fits: {total_elems} elements of state (x{SLICE_COPIES} at "
            f"{element_size} bytes, plus {units.gathered_elems} gathered parameters and "
            f"their gradient on every device) and a global batch of {B} do not fit the "
            "devices' memory"
        )
    step_s, k, samples, bs = best
    rooms = [state_room(d, b, total_elems, element_size, units) for d, b in zip(devices, bs)]
    slices = _fill(total_elems, rooms)
    return ProportionalPlan(
        micro_steps=k,
        samples=tuple(samples),
        micro_batches=tuple(_ragged(n, k) for n in samples),
        slices=tuple(slices),
        step_s=step_s,
        peak_bytes=tuple(
            peak_bytes(d, max(_ragged(n, k)), s, total_elems, element_size, units)
            for d, n, s in zip(devices, samples, slices)
        ),
    )


def _largest_b(d: ProportionalDevice, P: int, e: int, B: int, units: Units, s: int = 0) -> int:
    """The largest micro-batch beside a slice of `s` elements (default: none), at most B and
    the device's cap (0: not even one sample)."""
    b, top = 0, B if d.cap is None else min(B, d.cap)
    while b < top and state_room(d, b + 1, P, e, units) >= s:
        b += 1
    return b


def _time(d: ProportionalDevice, k: int, n: int) -> float:
    return d.step_overhead_s + k * d.fixed_s + d.per_sample_s * n


def _best_for_k(
    B: int,
    devices: Sequence[ProportionalDevice],
    caps: list[int],
    k: int,
    P: int,
    e: int,
    units: Units,
) -> tuple[float, list[int], list[int]] | None:
    """(step time, samples, micro-batch sizes) of the fastest plan with k micro-steps."""
    times = sorted(
        {_time(d, k, n) for d, m in zip(devices, caps) for n in range(k, min(B, k * m) + 1)}
    )
    lo, hi, found = 0, len(times) - 1, None
    while lo <= hi:  # the smallest feasible time
        mid = (lo + hi) // 2
        choice = _cover(B, devices, caps, k, times[mid], P, e, units)
        if choice is None:
            lo = mid + 1
        else:
            found, hi = (times[mid], *choice), mid - 1
    if found is None:
        return None
    T, samples, bs = found
    return max(_time(d, k, n) for d, n in zip(devices, samples)), samples, bs


def _cover(
    B: int,
    devices: Sequence[ProportionalDevice],
    caps: list[int],
    k: int,
    T: float,
    P: int,
    e: int,
    units: Units,
) -> tuple[list[int], list[int]] | None:
    """Samples per rank within step time T summing to B whose state rooms hold P elements
    (a knapsack over the ranks: samples covered, capped at B -> the most room), or None."""
    dp = np.full(B + 1, -1, dtype=np.int64)  # -1: not reachable
    dp[0] = 0
    back = []  # per rank, per covered count: (the count before, the rank's b)
    for d, m in zip(devices, caps, strict=True):
        limit = _limit(d, m, k, T, B)
        if limit < k:
            return None
        new = np.full(B + 1, -1, dtype=np.int64)
        prev_of = np.zeros(B + 1, dtype=np.int64)
        b_of = np.zeros(B + 1, dtype=np.int64)
        src = np.nonzero(dp >= 0)[0]
        for b in range(1, math.ceil(limit / k) + 1):
            room = state_room(d, b, P, e, units)
            if room < 0:
                break
            dst = np.minimum(src + min(k * b, limit), B)
            val = dp[src] + room
            for t, v, q in zip(dst, val, src, strict=True):
                if v > new[t]:
                    new[t], prev_of[t], b_of[t] = v, q, b
        back.append((prev_of, b_of))
        dp = new
    if dp[B] < P:
        return None
    bs = [0] * len(devices)
    covered = B
    for r in range(len(devices) - 1, -1, -1):
        prev_of, b_of = back[r]
        bs[r] = int(b_of[covered])
        covered = int(prev_of[covered])
    samples = [min(k * b, _limit(d, m, k, T, B)) for d, m, b in zip(devices, caps, bs, strict=True)]
    excess = sum(samples) - B  # taking fewer samples never costs time or memory
    for r in sorted(range(len(devices)), key=lambda r: -_time(devices[r], k, samples[r])):
        cut = min(excess, samples[r] - k)
        samples[r] -= cut
        excess -= cut
    return samples, [math.ceil(n / k) for n in samples]


def _limit(d: ProportionalDevice, m: int, k: int, T: float, B: int) -> int:
    """The most samples within step time T and micro-batch cap m (< k: none fits)."""
    limit = min(m * k, B)
    while limit >= k and _time(d, k, limit) > T:
        limit -= 1
    return limit


def _fill(total: int, rooms: list[int]) -> list[int]:
    """`total` elements over the ranks in proportion to their rooms, none over its room."""
    space = sum(rooms)
    slices = [total * room // space for room in rooms]
    for r in sorted(range(len(rooms)), key=lambda r: -(rooms[r] - slices[r])):
        if sum(slices) == total:
            break
        add = min(rooms[r] - slices[r], total - sum(slices))
        slices[r] += add
    assert sum(slices) == total and all(s <= room for s, room in zip(slices, rooms))
    return slices


def _ragged(n: int, k: int) -> tuple[int, ...]:
    """n samples as k micro-batches differing by at most one, the larger first."""
    return tuple(n // k + (1 if i < n % k else 0) for i in range(k))


# ---------------------------------------------------------------------------
# from a probe's capacities to a Plan

ELEMENT_BYTES = 4  # a trainable parameter's bytes (float32 weights; autocast does not change them)


def make_proportional_plan(
    global_batch_size: int, devices: Sequence[DeviceCapacity], *, keep_all: bool = False
) -> Plan:
    """The joint plan over the devices where the gathered model and one sample fit (with
    `keep_all`, every device or a PlanError). Each device's figures come from its memory
    model (`DeviceCapacity.memory`, a probe's replica lines): the micro-steps' lines less
    the replica's state are the activations, the budget is the proportional one (no DDP
    buckets), and the state is G bytes of trainable parameters at `ELEMENT_BYTES`, of
    which the root and the largest block are gathered at once (`units_of`)."""
    B = global_batch_size
    for d in devices:
        if d.memory is None:
            raise PlanError(
                f"device {d.device_id!r} ({d.name}) has no memory model: sharding="
                "'proportional' needs its model state and peak lines (DeviceCapacity.memory)"
            )
    state = devices[0].memory.state  # type: ignore[union-attr]
    total = max(1, state.grads_bytes // ELEMENT_BYTES)
    units = units_of(state)
    W = len(devices)
    pdevs = {d.device_id: proportional_device(d, W) for d in devices}
    fits = [
        d for d in devices if state_room(pdevs[d.device_id], 1, total, ELEMENT_BYTES, units) >= 0
    ]
    if not fits or (keep_all and len(fits) < len(devices)):
        unfit = [d for d in devices if d not in fits]
        raise PlanError(
            "with sharding proportional, "
            + "; ".join(
                f"{d.name} ({d.device_id}) needs "
                f"{size_text(peak_bytes(pdevs[d.device_id], 1, 0, total, ELEMENT_BYTES, units))} "
                "for one sample (the root and the largest block gathered with their "
                "gradients), its budget is "
                f"{size_text(pdevs[d.device_id].memory_bytes)}"
                for d in unfit
            )
        )
    W = len(fits)
    joint = plan_proportional(
        B, [proportional_device(d, W) for d in fits], total, ELEMENT_BYTES, units
    )
    ranks, inputs = [], []
    frozen = state.params_bytes - state.grads_bytes
    for i, d in enumerate(fits):
        mbs, s = joint.micro_batches[i], joint.slices[i]
        largest = rank_fit(d, W, s, B)[0]
        held = frozen + 2 * units.gathered_elems * ELEMENT_BYTES
        held += _slice_bytes(s, ELEMENT_BYTES, units)
        cap = replace(d.sharded("proportional", W), max_micro_batch=largest)
        inputs.append(cap)
        ranks.append(
            RankPlan(
                rank=i,
                device_id=d.device_id,
                device_name=d.name,
                micro_batches=mbs,
                max_micro_batch=largest,
                predicted_time_s=d.time_of(mbs),
                predicted_peak_bytes=joint.peak_bytes[i],
                state_bytes=held,
                state_slice=s,
            )
        )
    excluded = tuple(
        ExcludedDevice(d.device_id, d.name, "with sharding proportional, one sample does not "
                       "fit beside the root and the largest block gathered")
        for d in devices
        if d not in fits
    )  # fmt: skip
    note = (
        "proportional sharding gathers each unit (the root, each block) and reduces its "
        "gradient in every micro-step: the predicted times leave that communication out"
    )
    return Plan(
        global_batch_size=B,
        ranks=tuple(ranks),
        predicted_step_time_s=max(r.predicted_time_s for r in ranks),
        ideal_samples_per_s=sum(c.best_samples_per_s(B) for c in inputs),
        excluded=excluded,
        inputs=tuple(inputs),
        notes=(note,),
        sharding="proportional",
    )


def rank_fit(
    d: DeviceCapacity, world_size: int, state_slice: int, global_batch_size: int
) -> tuple[int, int, int]:
    """Device `d` among `world_size` ranks under "proportional", owning `state_slice`
    trainable elements (0: none): (its largest micro-batch up to the global batch, 0 when
    not even one sample fits; its peak at micro-batch 1; its budget), in bytes."""
    assert d.memory is not None
    state = d.memory.state
    total = max(1, state.grads_bytes // ELEMENT_BYTES)
    units, pd = units_of(state), proportional_device(d, world_size)
    largest = _largest_b(pd, total, ELEMENT_BYTES, global_batch_size, units, state_slice)
    need = peak_bytes(pd, 1, state_slice, total, ELEMENT_BYTES, units)
    return largest, need, pd.memory_bytes


def units_of(state: ModelState) -> Units:
    """The units of a probed model: R + U gathered at once (G when unknown), and
    1 + (G - R) / U units (exact when the blocks are of one size, a transformer's)."""
    gathered = proportional_gathered_bytes(state) // ELEMENT_BYTES
    U, R, G = state.largest_unit_bytes, state.root_unit_bytes, state.grads_bytes
    count = 1 + (-(-max(0, G - R) // U) if U else 0)
    return Units(max(1, gathered), count)


def proportional_device(d: DeviceCapacity, W: int) -> ProportionalDevice:
    """`d`'s figures for the joint planner: activations = the micro-steps' lines less the
    replica's state, plus the frozen parameters every rank keeps whole; the optimizer
    step's temporaries = the replica's step peak less its state, per trainable element
    (foreach AdamW, CUDA's default: one copy of the parameters, so one element's bytes;
    piece by piece, the CPU's, two copies of the largest piece, below a micro-step's
    peak, here spread over the elements)."""
    memory = d.memory
    assert memory is not None
    state = memory.state
    frozen = state.params_bytes - state.grads_bytes
    fixed = max(x.fixed_bytes for x in memory.micro_lines) - state.total_bytes + frozen
    temps = max(0.0, memory.optimizer_line.fixed_bytes - state.total_bytes)
    return ProportionalDevice(
        memory_bytes=memory.budget("proportional", W),
        fixed_bytes=max(0, math.ceil(fixed)),
        per_sample_bytes=max(x.per_sample_bytes for x in memory.micro_lines),
        fixed_s=d.fixed_s,
        per_sample_s=d.per_sample_s,
        step_overhead_s=d.step_overhead_s,
        cap=memory.cap,
        step_fixed_bytes=frozen,
        step_temp_bytes=temps / max(1, state.grads_bytes // ELEMENT_BYTES),
    )
