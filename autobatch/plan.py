"""The planner: split a fixed global batch over heterogeneous devices.

A pure function of values. Each device brings what it can do for this job (a
`DeviceCapacity`: its largest micro-batch and a linear time model per
micro-step); `make_plan` returns a `Plan` in which every rank has its exact
list of micro-batch sizes, the sizes sum to the global batch, and the slowest
rank's predicted step time is as small as it can be.

The time of a rank that processes s samples per optimizer step in
k = ceil(s / m) near-equal micro-batches is

    T(s) = step_overhead + k * fixed + per_sample * s        (T(0) = 0: left out)

T is non-decreasing in s, so "can every rank finish within T?" is monotone in
T: binary search the smallest feasible T, then hand out exactly B samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from autobatch.errors import PlanError

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DeviceCapacity:
    """What one device can do for one job: the planner's whole view of it.

    `max_micro_batch` comes from the memory model (the largest micro-batch that
    fits); the time model is `fixed_s + per_sample_s * b` seconds per micro-step
    of b samples, plus `step_overhead_s` once per optimizer step (optimizer
    update, gradient all-reduce). The memory fields are optional and only used
    for reporting and for error messages.
    """

    device_id: str
    name: str
    max_micro_batch: int
    fixed_s: float
    per_sample_s: float
    step_overhead_s: float = 0.0
    memory_bytes: int | None = None
    peak_fixed_bytes: int | None = None
    peak_per_sample_bytes: int | None = None
    simulated: bool = False
    estimated: bool = False
    gradient_checkpointing: bool = False  # the figures hold with activation checkpointing on

    def __post_init__(self) -> None:
        for name in ("fixed_s", "per_sample_s", "step_overhead_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(
                    f"device {self.device_id!r}: {name}={value!r} must be a finite number >= 0"
                )
        if self.fixed_s + self.per_sample_s <= 0:
            raise PlanError(
                f"device {self.device_id!r}: fixed_s + per_sample_s must be > 0 "
                "(a micro-step cannot take no time)"
            )

    def micro_step_time(self, b: int) -> float:
        return self.fixed_s + self.per_sample_s * b

    def rank_time(self, samples: int) -> float:
        """Predicted time of one optimizer step in which this device does `samples`
        in the fewest micro-batches its limit allows."""
        if samples <= 0:
            return 0.0
        k = _ceil_div(samples, self.max_micro_batch)
        return self.step_overhead_s + k * self.fixed_s + self.per_sample_s * samples

    def time_of(self, micro_batches: Sequence[int]) -> float:
        """Predicted time of one optimizer step made of exactly these micro-batches."""
        if not micro_batches:
            return 0.0
        n = len(micro_batches)
        return self.step_overhead_s + n * self.fixed_s + self.per_sample_s * sum(micro_batches)

    def predicted_peak_bytes(self, b: int) -> int | None:
        if self.peak_fixed_bytes is None or self.peak_per_sample_bytes is None:
            return None
        return int(self.peak_fixed_bytes + self.peak_per_sample_bytes * b)

    def best_samples_per_s(self, global_batch_size: int) -> float:
        """Its best throughput alone, processing at most B samples per step.

        Within (k*m, (k+1)*m] the rate s / T(s) rises with s, and at full
        multiples k*m it rises with k, so the best is at B or at the largest
        full multiple of m not above B.
        """
        m = self.max_micro_batch
        candidates = {global_batch_size, (global_batch_size // m) * m}
        return max(s / self.rank_time(s) for s in candidates if s > 0)


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of every optimizer step."""

    rank: int
    device_id: str
    device_name: str
    micro_batches: tuple[int, ...]
    max_micro_batch: int
    predicted_time_s: float
    predicted_peak_bytes: int | None = None

    @property
    def samples(self) -> int:
        return sum(self.micro_batches)

    @property
    def accumulation_steps(self) -> int:
        return len(self.micro_batches)

    @property
    def micro_batch_size(self) -> int:
        return max(self.micro_batches)


@dataclass(frozen=True)
class ExcludedDevice:
    device_id: str
    device_name: str
    reason: str


@dataclass(frozen=True)
class Baseline:
    """What a DDP user gets today: every device at the smallest device's micro-batch."""

    micro_batch_size: int
    accumulation_steps: int
    step_time_s: float
    samples_per_s: float


@dataclass(frozen=True)
class Plan:
    """Per-rank micro-batch lists for one global batch, and the predictions behind them.

    The invariants are checked at construction: the micro-batches of all ranks
    sum to exactly `global_batch_size`, every micro-batch is within its
    device's limit, and within one rank sizes differ by at most one.
    """

    global_batch_size: int
    ranks: tuple[RankPlan, ...]
    predicted_step_time_s: float
    ideal_samples_per_s: float
    baseline: Baseline | None = None
    excluded: tuple[ExcludedDevice, ...] = ()
    inputs: tuple[DeviceCapacity, ...] = field(default=(), compare=True)
    # Choices made with the plan and why, e.g. "precision bf16: every device supports bf16".
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.ranks:
            raise PlanError("a plan needs at least one rank")
        total = sum(r.samples for r in self.ranks)
        if total != self.global_batch_size:
            raise PlanError(
                f"micro-batches sum to {total}, not the global batch {self.global_batch_size}"
            )
        for i, r in enumerate(self.ranks):
            if r.rank != i:
                raise PlanError(f"ranks must be numbered 0..{len(self.ranks) - 1}; got {r.rank}")
            if not r.micro_batches or min(r.micro_batches) < 1:
                raise PlanError(f"rank {i}: every micro-batch needs >= 1 sample")
            if max(r.micro_batches) > r.max_micro_batch:
                raise PlanError(
                    f"rank {i} ({r.device_name}): micro-batch {max(r.micro_batches)} exceeds "
                    f"its limit {r.max_micro_batch}"
                )
            if max(r.micro_batches) - min(r.micro_batches) > 1:
                raise PlanError(f"rank {i}: micro-batch sizes {r.micro_batches} differ by > 1")

    # -- derived figures -------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def predicted_samples_per_s(self) -> float:
        return self.global_batch_size / self.predicted_step_time_s

    @property
    def efficiency(self) -> float:
        """Predicted throughput over the ideal (sum of each device alone at its best)."""
        return self.predicted_samples_per_s / self.ideal_samples_per_s

    @property
    def speedup_vs_baseline(self) -> float | None:
        if self.baseline is None:
            return None
        return self.predicted_samples_per_s / self.baseline.samples_per_s

    def rank_offsets(self) -> tuple[int, ...]:
        """Start of each rank's contiguous share within the global batch."""
        offsets, start = [], 0
        for r in self.ranks:
            offsets.append(start)
            start += r.samples
        return tuple(offsets)

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        out = asdict(self)
        out["format_version"] = PLAN_FORMAT_VERSION
        out["summary"] = {
            "world_size": self.world_size,
            "predicted_samples_per_s": self.predicted_samples_per_s,
            "efficiency": self.efficiency,
            "speedup_vs_baseline": self.speedup_vs_baseline,
        }
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(
                f"plan format_version={version!r} is not supported (expected {PLAN_FORMAT_VERSION})"
            )
        ranks = tuple(
            RankPlan(**{**r, "micro_batches": tuple(r["micro_batches"])}) for r in data["ranks"]
        )
        baseline = Baseline(**data["baseline"]) if data.get("baseline") else None
        return cls(
            global_batch_size=data["global_batch_size"],
            ranks=ranks,
            predicted_step_time_s=data["predicted_step_time_s"],
            ideal_samples_per_s=data["ideal_samples_per_s"],
            baseline=baseline,
            excluded=tuple(ExcludedDevice(**e) for e in data.get("excluded", ())),
            inputs=tuple(DeviceCapacity(**d) for d in data.get("inputs", ())),
            notes=tuple(data.get("notes", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # -- rendering ---------------------------------------------------------
    def table_rows(self) -> list[dict[str, str]]:
        """One row of display strings per rank (used by the text and rich tables)."""
        by_id = {d.device_id: d for d in self.inputs}
        rows = []
        for r in self.ranks:
            dev = by_id.get(r.device_id)
            memory = _gib(dev.memory_bytes) if dev and dev.memory_bytes else "-"
            tag = " (sim)" if dev and dev.simulated else " (est)" if dev and dev.estimated else ""
            rows.append(
                {
                    "rank": str(r.rank),
                    "device": f"{r.device_name}{tag}",
                    "memory": memory,
                    "micro-batches": _micro_batches_text(r.micro_batches),
                    "accum": str(r.accumulation_steps),
                    "samples/step": str(r.samples),
                    "pred. peak": _gib(r.predicted_peak_bytes) if r.predicted_peak_bytes else "-",
                    "pred. time": f"{r.predicted_time_s * 1e3:.1f} ms",
                }
            )
        return rows

    def summary_lines(self) -> list[str]:
        lines = [
            f"global batch {self.global_batch_size} on {self.world_size} rank(s): "
            f"predicted step {self.predicted_step_time_s * 1e3:.1f} ms, "
            f"{self.predicted_samples_per_s:,.1f} samples/s, "
            f"efficiency {self.efficiency:.1%} of ideal ({self.ideal_samples_per_s:,.1f} samples/s)"
        ]
        if self.baseline is not None:
            b = self.baseline
            lines.append(
                f"equal split (micro-batch {b.micro_batch_size} x {b.accumulation_steps} on every "
                f"device): {b.samples_per_s:,.1f} samples/s; this plan is "
                f"{self.speedup_vs_baseline:.2f}x"
            )
        lines += [f"left out {e.device_id} ({e.device_name}): {e.reason}" for e in self.excluded]
        return lines + list(self.notes)

    def render_table(self) -> str:
        rows = self.table_rows()
        headers = list(rows[0])
        widths = {h: max(len(h), *(len(row[h]) for row in rows)) for h in headers}
        out = ["  ".join(h.ljust(widths[h]) for h in headers)]
        out.append("  ".join("-" * widths[h] for h in headers))
        out += ["  ".join(row[h].ljust(widths[h]) for h in headers) for row in rows]
        return "\n".join(out + self.summary_lines())


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _micro_batches_text(micro_batches: Sequence[int]) -> str:
    """[8, 8, 7] -> '8x2 + 7x1'."""
    parts = []
    for size in sorted(set(micro_batches), reverse=True):
        parts.append(f"{size}x{micro_batches.count(size)}")
    return " + ".join(parts)


# ---------------------------------------------------------------------------
# planning


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_evenly(samples: int, max_micro_batch: int) -> tuple[int, ...]:
    """`samples` as the fewest micro-batches <= max_micro_batch, sizes differing by <= 1."""
    k = _ceil_div(samples, max_micro_batch)
    base, extra = divmod(samples, k)
    return (base + 1,) * extra + (base,) * (k - extra)


def _check_inputs(global_batch_size: int, devices: Sequence[DeviceCapacity]) -> None:
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
        if d.max_micro_batch < 1:
            raise PlanError(_cannot_fit_message(d))


def _cannot_fit_message(d: DeviceCapacity) -> str:
    msg = f"device {d.device_id!r} ({d.name}) cannot fit even one sample"
    if d.memory_bytes is not None and d.peak_fixed_bytes is not None:
        need = d.predicted_peak_bytes(1)
        msg += f": it has {_gib(d.memory_bytes)} for training, one sample needs {_gib(need)}"
    return msg + "; remove it from the job or lower the sequence length / precision"


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
        """Per device, the most samples it can do in one step of at most T seconds."""
        rest = T - self.o
        full = self.a + self.c * self.m
        k = np.floor(np.maximum(rest, 0.0) / full).astype(np.int64)
        s = k * self.m  # k full micro-batches
        # ... or one more, partial, micro-batch
        with np.errstate(divide="ignore", invalid="ignore"):
            room = rest - (k + 1) * self.a
            partial = np.where(self.c > 0, np.floor(room / self.c), np.where(room >= 0, self.m, -1))
        partial = np.minimum(partial, (k + 1) * self.m)
        s = np.maximum(s, np.where(room >= 0, partial, 0)).astype(np.int64)
        s = np.clip(s, 0, self.B)
        for _ in range(3):  # floating-point rounding: make T(s) <= T hold exactly
            s = np.where(self.time(s) > T, s - 1, s)
        return np.where((s < self.B) & (self.time(s + 1) <= T), s + 1, s)


def make_plan(
    global_batch_size: int,
    devices: Sequence[DeviceCapacity],
    *,
    baseline: bool = True,
    keep_all: bool = False,
) -> Plan:
    """The plan that minimises the slowest rank's predicted step time.

    Ranks follow the order of `devices` (left-out devices are skipped). A
    device is left out only when the others finish the step no later without
    it; the reason is recorded in `Plan.excluded`. With `keep_all` (a running
    process group cannot shrink) every device gets at least one sample: one
    each, and the rest planned as above.
    """
    _check_inputs(global_batch_size, devices)
    if keep_all:
        return _plan_keeping_all(global_batch_size, devices, baseline=baseline)
    samples = _optimal_samples(global_batch_size, devices)
    return _assemble(global_batch_size, devices, samples, baseline=baseline)


def _plan_keeping_all(B: int, devices: Sequence[DeviceCapacity], *, baseline: bool) -> Plan:
    if len(devices) > B:
        raise PlanError(
            f"global_batch_size={B} is smaller than the {len(devices)} devices that must each "
            "take at least one sample"
        )
    return _assemble(B, devices, _optimal_samples(B, devices, at_least=1), baseline=baseline)


def _optimal_samples(
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


def _assemble(
    B: int, devices: Sequence[DeviceCapacity], samples: np.ndarray, *, baseline: bool
) -> Plan:
    ranks, excluded = [], []
    step_time = max(d.rank_time(int(s)) for d, s in zip(devices, samples))
    for d, s in zip(devices, samples):
        s = int(s)
        if s == 0:
            excluded.append(ExcludedDevice(d.device_id, d.name, _exclusion_reason(d, step_time)))
            continue
        mbs = split_evenly(s, d.max_micro_batch)
        ranks.append(
            RankPlan(
                rank=len(ranks),
                device_id=d.device_id,
                device_name=d.name,
                micro_batches=mbs,
                max_micro_batch=d.max_micro_batch,
                predicted_time_s=d.rank_time(s),
                predicted_peak_bytes=d.predicted_peak_bytes(max(mbs)),
            )
        )
    return Plan(
        global_batch_size=B,
        ranks=tuple(ranks),
        predicted_step_time_s=step_time,
        ideal_samples_per_s=sum(d.best_samples_per_s(B) for d in devices),
        baseline=equal_split_baseline(B, devices) if baseline else None,
        excluded=tuple(excluded),
        inputs=tuple(devices),
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
    _check_inputs(global_batch_size, devices)
    n = min(len(devices), global_batch_size)
    used = devices[:n]
    micro = min(d.max_micro_batch for d in used)
    accum = _ceil_div(_ceil_div(global_batch_size, n), micro)
    ranks = []
    for i, d in enumerate(used):
        share = global_batch_size // n + (1 if i < global_batch_size % n else 0)
        base, extra = divmod(share, accum)
        mbs = tuple(x for x in (base + 1,) * extra + (base,) * (accum - extra) if x > 0)
        ranks.append(
            RankPlan(
                rank=i,
                device_id=d.device_id,
                device_name=d.name,
                micro_batches=mbs,
                max_micro_batch=d.max_micro_batch,
                predicted_time_s=d.time_of(mbs),
                predicted_peak_bytes=d.predicted_peak_bytes(max(mbs)),
            )
        )
    excluded = tuple(
        ExcludedDevice(d.device_id, d.name, "fewer samples than devices") for d in devices[n:]
    )
    return Plan(
        global_batch_size=global_batch_size,
        ranks=tuple(ranks),
        predicted_step_time_s=max(r.predicted_time_s for r in ranks),
        ideal_samples_per_s=sum(d.best_samples_per_s(global_batch_size) for d in devices),
        baseline=None,
        excluded=excluded,
        inputs=tuple(devices),
    )


def equal_split_baseline(global_batch_size: int, devices: Sequence[DeviceCapacity]) -> Baseline:
    eq = equal_split_plan(global_batch_size, devices)
    return Baseline(
        micro_batch_size=max(r.micro_batch_size for r in eq.ranks),
        accumulation_steps=max(r.accumulation_steps for r in eq.ranks),
        step_time_s=eq.predicted_step_time_s,
        samples_per_s=eq.predicted_samples_per_s,
    )
