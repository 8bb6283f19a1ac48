"""What one device can do for one job: the planner's whole view of it, as a value.

`DeviceCapacity` holds a device's largest micro-batch, its time model per micro-step
and per optimizer step, and optionally its memory model (autobatch.planning.memory),
from which `sharded(mode, W)` re-derives its memory figures for a sharding mode and
world size. A probe makes one from a measured profile (`plan_for_group` does both);
a library user may write one by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from autobatch.errors import PlanError
from autobatch.levers import Sharding, check_sharding
from autobatch.planning.memory import MemoryModel, check_world_size

MIN_MICRO_STEP_S = 1e-9  # no device runs a micro-step of one sample faster than this


@dataclass(frozen=True)
class DeviceCapacity:
    """What one device can do for one job: the planner's whole view of it.

    `max_micro_batch` comes from the memory model (the largest micro-batch that
    fits); the time model is `fixed_s + per_sample_s * b` seconds per micro-step
    of b samples, plus `step_overhead_s` once per optimizer step (optimizer
    update, gradient all-reduce). The memory fields are optional and only used
    for reporting and for error messages.

    `time_note` says why the time model is not to be trusted (a probe's fit that failed its
    checks, autobatch.probe.time_fit); `make_plan` lists it in the plan's notes.

    `sharding` and `world_size` say what the memory figures hold for ("none": a
    replica, any world size). With a `memory` model (from a probe's profile),
    `sharded(mode, W)` re-derives them for another mode or world size.
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
    sharding: Sharding = "none"
    world_size: int | None = None  # the ranks the memory figures hold for (None: any)
    memory: MemoryModel | None = None
    time_note: str = ""  # why the time line is not trusted (the probe's fit); empty: trusted

    def __post_init__(self) -> None:
        check_sharding(self.sharding)
        if self.sharding != "none" and self.world_size is None:
            raise PlanError(
                f"device {self.device_id!r}: sharding={self.sharding!r} needs its world_size"
            )
        if self.world_size is not None:
            check_world_size(self.world_size)
        for name in ("fixed_s", "per_sample_s", "step_overhead_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(
                    f"device {self.device_id!r}: {name}={value!r} must be a finite number >= 0"
                )
        if self.fixed_s + self.per_sample_s < MIN_MICRO_STEP_S:
            raise PlanError(
                f"device {self.device_id!r}: fixed_s + per_sample_s must be at least "
                f"{MIN_MICRO_STEP_S:g} s (a micro-step cannot take no time)"
            )

    def micro_step_time(self, b: int) -> float:
        return self.fixed_s + self.per_sample_s * b

    def sharded(self, sharding: Sharding, world_size: int | None = None) -> DeviceCapacity:
        """This device's capacity with `sharding` over `world_size` ranks (from its memory
        model; "none" needs no world size). The time model is unchanged."""
        check_sharding(sharding)
        if self.memory is None:
            if sharding == self.sharding == "none":
                return self
            raise PlanError(
                f"device {self.device_id!r} ({self.name}) has no memory model: planning "
                f"sharding={sharding!r} needs its model state and peak lines: give "
                "DeviceCapacity(memory=MemoryModel(...)) (MemoryModel, ModelState and "
                "PeakLine are in autobatch), or plan with plan_for_group, which measures them"
            )
        if sharding != "none" and world_size is None:
            raise PlanError(f"sharding={sharding!r} needs the world size it holds for")
        world = None if sharding == "none" else check_world_size(world_size)
        fit = self.memory.fit(sharding, world or 1)
        return replace(
            self,
            max_micro_batch=fit.max_micro_batch,
            peak_fixed_bytes=fit.peak_fixed_bytes,
            peak_per_sample_bytes=fit.peak_per_sample_bytes,
            sharding=sharding,
            world_size=world,
        )

    def state_bytes(self) -> int | None:
        """Parameters, gradients and optimizer state this rank holds during its micro-steps
        (None without a memory model)."""
        if self.memory is None:
            return None
        return self.memory.state.per_rank(self.sharding, self.world_size or 1)

    @classmethod
    def from_dict(cls, data: dict) -> DeviceCapacity:
        memory = data.get("memory")
        return cls(**{**data, "memory": MemoryModel.from_dict(memory) if memory else None})

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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
