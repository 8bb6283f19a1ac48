"""A plan: per rank, its device and its exact micro-batch sizes, and the predictions.

Values only. `Plan` checks at construction that its micro-batches sum to the global
batch and respect each device's limit, and serialises to JSON (logged, exported,
replayable, diffable). What a device brings to a job is its `DeviceCapacity`
(autobatch.planning.capacity); the planner that makes a plan is
`autobatch.planning.planner.make_plan`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from autobatch.errors import PlanError
from autobatch.levers import Sharding, check_sharding
from autobatch.planning.capacity import DeviceCapacity

PLAN_FORMAT_VERSION = 1


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
    state_bytes: int | None = None  # parameters, gradients, optimizer state held (sharded or not)
    state_slice: int | None = None  # "proportional": the trainable elements this rank owns

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
    device's limit, and within one rank sizes differ by at most one. With
    `sharding="full"` every rank runs the same number of micro-steps, and a
    sharded plan's ranks were planned for its world size.
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
    sharding: Sharding = "none"  # how the model is spread over the ranks (planning.memory)

    def __post_init__(self) -> None:
        if not self.ranks:
            raise PlanError("a plan needs at least one rank")
        check_sharding(self.sharding)
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
        self._check_sharding()

    def _check_sharding(self) -> None:
        counts = {r.accumulation_steps for r in self.ranks}
        if self.sharding in ("full", "proportional") and len(counts) > 1:
            raise PlanError(
                f"sharding={self.sharding!r} needs the same number of micro-steps on every "
                f"rank; got {[r.accumulation_steps for r in self.ranks]} (each micro-step "
                "gathers the parameters)"
            )
        slices = [r.state_slice for r in self.ranks]
        if self.sharding == "proportional" and any(s is None or s < 0 for s in slices):
            raise PlanError(f"sharding='proportional' needs every rank's state_slice; got {slices}")
        by_id = {d.device_id: d for d in self.inputs}
        for r in self.ranks:
            d = by_id.get(r.device_id)
            if d is None or self.sharding == "none" == d.sharding:
                continue
            if (d.sharding, d.world_size) != (self.sharding, self.world_size):
                raise PlanError(
                    f"rank {r.rank} ({r.device_name}) was planned with sharding={d.sharding!r} "
                    f"over {d.world_size} ranks; the plan is {self.sharding!r} over "
                    f"{self.world_size}"
                )

    # -- derived figures -------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def state_slices(self) -> tuple[int, ...] | None:
        """Under "proportional", the trainable elements each rank owns, in rank order; else None."""
        if self.sharding != "proportional":
            return None
        return tuple(r.state_slice for r in self.ranks)  # type: ignore[misc]

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
    def capacity(self, rank: int) -> DeviceCapacity:
        """What rank `rank`'s device was planned with."""
        device_id = self.ranks[rank].device_id
        return next(d for d in self.inputs if d.device_id == device_id)

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
            inputs=tuple(DeviceCapacity.from_dict(d) for d in data.get("inputs", ())),
            notes=tuple(data.get("notes", ())),
            sharding=data.get("sharding", "none"),  # plans written before sharding: replicas
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # -- rendering ---------------------------------------------------------
    def table_rows(self) -> list[dict[str, str]]:
        """One row of display strings per rank (used by the text and rich tables)."""
        by_id = {d.device_id: d for d in self.inputs}
        with_state = any(r.state_bytes is not None for r in self.ranks)
        rows = []
        for r in self.ranks:
            dev = by_id.get(r.device_id)
            memory = size_text(dev.memory_bytes) if dev and dev.memory_bytes else "-"
            tag = " (sim)" if dev and dev.simulated else " (est)" if dev and dev.estimated else ""
            row = {
                "rank": str(r.rank),
                "device": f"{r.device_name}{tag}",
                "memory": memory,
                "micro-batches": _micro_batches_text(r.micro_batches),
                "accum": str(r.accumulation_steps),
                "samples/step": str(r.samples),
            }
            if with_state:
                row["state/rank"] = size_text(r.state_bytes)
            if self.sharding == "proportional":
                total = sum(self.state_slices or ()) or 1
                row["share"] = f"{100 * (r.state_slice or 0) / total:.1f}%"
            row["pred. peak"] = size_text(r.predicted_peak_bytes) if r.predicted_peak_bytes else "-"
            row["pred. time"] = f"{r.predicted_time_s * 1e3:.1f} ms"
            rows.append(row)
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
        if self.sharding != "none" or any(r.state_bytes is not None for r in self.ranks):
            lines.append(self._sharding_line())
        lines += [f"left out {e.device_id} ({e.device_name}): {e.reason}" for e in self.excluded]
        return lines + list(self.notes)

    def _sharding_line(self) -> str:
        what = {
            "none": "every rank holds a full replica (DDP)",
            "optimizer": "FSDP2, parameters gathered for the whole step, gradients "
            "reduce-scattered at its end, optimizer state sharded",
            "full": "FSDP2, parameters, gradients and optimizer state sharded; every rank "
            f"runs {self.ranks[0].accumulation_steps} micro-step(s)",
            "proportional": "each rank owns a planned share of the flat parameters, gradients "
            "and optimizer state; the whole model gathered at every micro-step; every rank "
            f"runs {self.ranks[0].accumulation_steps} micro-step(s)",
        }[self.sharding]
        states = {r.state_bytes for r in self.ranks if r.state_bytes is not None}
        held = f"; state per rank {size_text(max(states))}" if states else ""
        return f"sharding {self.sharding} over {self.world_size} rank(s): {what}{held}"

    def render_table(self) -> str:
        rows = self.table_rows()
        headers = list(rows[0])
        widths = {h: max(len(h), *(len(row[h]) for row in rows)) for h in headers}
        out = ["  ".join(h.ljust(widths[h]) for h in headers)]
        out.append("  ".join("-" * widths[h] for h in headers))
        out += ["  ".join(row[h].ljust(widths[h]) for h in headers) for row in rows]
        return "\n".join(out + self.summary_lines())


def size_text(n: int | None) -> str:
    """Bytes as the plan's tables write them: GiB, MiB, KiB or B; "-" for unknown."""
    if n is None:
        return "-"
    if n < 0:  # a budget the reserves overdraw (the what-if's DDP buckets on a small GPU)
        return f"-{size_text(-n)}"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"  # a tiny simulated device


def _micro_batches_text(micro_batches: Sequence[int]) -> str:
    """[8, 8, 7] -> '8x2 + 7x1'."""
    parts = []
    for size in sorted(set(micro_batches), reverse=True):
        parts.append(f"{size}x{micro_batches.count(size)}")
    return " + ".join(parts)
