"""ModelProfile: what one device can do for one job, as the profile measured it; a value.

It holds the device's budget, the peak lines fitted to the measured steps, the time
per micro-step, the largest micro-batch (verified by a step, or predicted from the
lines on a cache hit), and the model's state (`ModelState`). `capacity()` is the
planner's view of it, for a replica or for a model sharded over W ranks;
`carried_to()` takes it to a device of the job where nothing could be measured;
`to_json()` / `from_json()` carry it between processes and runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from autobatch.errors import ProbeError
from autobatch.levers import Sharding
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.memory import MemoryModel, ModelState
from autobatch.probe.cache import PROFILE_FORMAT_VERSION
from autobatch.probe.devices import DeviceInfo
from autobatch.probe.measure import StepMeasurement
from autobatch.probe.peak import PeakLine, largest_under, micro_lines, optimizer_line, peak_at

DEFAULT_MAX_MICRO_BATCH = 4096


def search_cap(global_batch_size: int) -> int:
    """The largest micro-batch a job's probe searches: no rank's is ever larger than the
    global batch, and none past the default cap however large the batch."""
    return min(global_batch_size, DEFAULT_MAX_MICRO_BATCH)


MAX_EXTRAPOLATION = 4  # predict at most 4x beyond the largest size that fitted, else go 2/3 way


@dataclass(frozen=True)
class ModelProfile:
    """What one device can do for one job; `capacity()` is the planner's view of it."""

    device_name: str
    device_uuid: str
    precision: str
    usable_bytes: int  # what torch may hold on the device for this job
    headroom_bytes: int
    reserve: tuple[tuple[str, int], ...]  # (what, bytes) the measurement cannot see
    budget_bytes: int  # usable - headroom - reserve: the largest allowed measured peak
    peak_lines: tuple[PeakLine, ...]  # peak(b) = the max of these (torch-allocated bytes)
    fixed_s: float  # time per micro-step: fixed_s + per_sample_s * b
    per_sample_s: float
    step_overhead_s: float  # optimizer step, once per optimizer step
    backward_factor: float  # (forward + backward) / forward, for `Pacer.wrap_loss_fn`
    max_micro_batch: int
    verified: bool  # max_micro_batch ran a whole step within budget
    measurements: tuple[StepMeasurement, ...]
    measured_steps: int  # steps this call ran (0 on a cache hit)
    cached: bool
    simulated: bool
    estimated: bool = False
    cache_key: str = ""
    gradient_checkpointing: bool = False  # measured with activation checkpointing on
    state: ModelState | None = None  # parameters, gradients, optimizer state, sharding units
    micro_batch_cap: int = DEFAULT_MAX_MICRO_BATCH  # the caller's max_micro_batch
    time_trusted: bool = True  # the time line passed its checks (autobatch.probe.time_fit)
    time_note: str = ""  # why it did not, in words

    @property
    def reserve_bytes(self) -> int:
        return sum(v for _, v in self.reserve)

    def peak_bytes(self, b: int) -> int:
        """Predicted peak of a training step at micro-batch b (torch-allocated bytes)."""
        return peak_at(self.peak_lines, b)

    def measurement_at(self, b: int) -> StepMeasurement | None:
        return next((m for m in self.measurements if m.micro_batch == b and not m.oom), None)

    def capacity(
        self,
        device_id: str,
        name: str | None = None,
        *,
        sharding: Sharding = "none",
        world_size: int | None = None,
    ) -> DeviceCapacity:
        """The planner's input. Its peak line is the chord of peak(b) over [1, max]: since
        peak(b) is a max of lines (convex), the chord is never below it there.

        `sharding` over `world_size` ranks: the figures for a sharded model (predicted,
        needs `state`); the capacity carries its `memory_model()` either way, so the
        planner can re-derive them for the world size it includes."""
        m = self.max_micro_batch
        per = 0 if m == 1 else math.ceil((self.peak_bytes(m) - self.peak_bytes(1)) / (m - 1))
        capacity = DeviceCapacity(
            device_id=device_id,
            name=name or self.device_name,
            max_micro_batch=m,
            fixed_s=self.fixed_s,
            per_sample_s=self.per_sample_s,
            step_overhead_s=self.step_overhead_s,
            memory_bytes=self.usable_bytes,
            peak_fixed_bytes=self.peak_bytes(1) - per,
            peak_per_sample_bytes=per,
            simulated=self.simulated,
            estimated=self.estimated,
            gradient_checkpointing=self.gradient_checkpointing,
            memory=self.memory_model(),
            time_note="" if self.time_trusted else self.time_note or "not trusted",
        )
        if sharding == "none":
            return capacity
        if capacity.memory is None:
            raise ProbeError(
                f"{self.device_name}: this profile has no model state (parameters, gradients, "
                f"optimizer state) to plan sharding={sharding!r}; profile it again with "
                "profile_model"
            )
        return capacity.sharded(sharding, world_size)

    def carried_to(
        self,
        info: DeviceInfo,
        *,
        headroom_fraction: float,
        time_scale: float,
        extra_reserve: tuple[tuple[str, int], ...] = (),
        extra_optimizer_bytes: int = 0,
    ) -> ModelProfile:
        """This profile on another device of the job, one where a replica does not fit a
        sample (so nothing could be measured there) but a sharded model may: the memory
        lines and state are the model's, the budget the device's (its total memory less
        the headroom, this profile's reserve and `extra_reserve`: what the source device
        did not have), the times times `time_scale` (how much slower the device is).
        `extra_optimizer_bytes`: what the optimizer step takes there beyond the source's
        (foreach AdamW on a GPU, one copy of the trainable parameters, where a CPU steps
        tensor by tensor). Estimated, never verified."""
        usable = info.total_bytes
        headroom = int(headroom_fraction * usable)
        reserve = (*self.reserve, *extra_reserve)
        budget = usable - headroom - sum(v for _, v in reserve)
        measurements = tuple(
            replace(m, optimizer_peak_bytes=m.optimizer_peak_bytes + extra_optimizer_bytes)
            if m.optimizer_peak_bytes is not None
            else m
            for m in self.measurements
        )
        lines = self.peak_lines  # peak(b) is their max: the raised optimizer line joins them
        if extra_optimizer_bytes:
            lines = (*lines, optimizer_line([m for m in measurements if not m.oom]))
        return replace(
            self,
            measurements=measurements,
            peak_lines=lines,
            reserve=reserve,
            device_name=info.name,
            device_uuid=info.uuid,
            usable_bytes=usable,
            headroom_bytes=headroom,
            budget_bytes=budget,
            max_micro_batch=largest_under(lines, budget, self.micro_batch_cap),
            fixed_s=self.fixed_s * time_scale,
            per_sample_s=self.per_sample_s * time_scale,
            step_overhead_s=self.step_overhead_s * time_scale,
            verified=False,  # the measurements stay: the model's memory, whatever the device
            measured_steps=0,
            cached=False,
            estimated=True,
        )

    def memory_model(self) -> MemoryModel | None:
        """This device's memory for any sharding mode and world size (None without `state`).
        Sharded predictions reach at most MAX_EXTRAPOLATION x the largest measured size."""
        if self.state is None:
            return None
        ok = [m for m in self.measurements if not m.oom]
        reach = min(self.micro_batch_cap, MAX_EXTRAPOLATION * max(m.micro_batch for m in ok))
        return MemoryModel(
            budget_bytes=self.budget_bytes,
            micro_lines=micro_lines(ok),
            optimizer_line=optimizer_line(ok),
            state=self.state,
            max_micro_batch=self.max_micro_batch,
            cap=max(self.max_micro_batch, reach),
            replica_reserve_bytes=dict(self.reserve).get("ddp_gradient_buckets", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "format_version": PROFILE_FORMAT_VERSION}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != PROFILE_FORMAT_VERSION:
            raise ProbeError(
                f"profile format_version={version!r} is not supported "
                f"(expected {PROFILE_FORMAT_VERSION})"
            )
        data["reserve"] = tuple((k, int(v)) for k, v in data["reserve"])
        data["peak_lines"] = tuple(PeakLine(**line) for line in data["peak_lines"])
        data["measurements"] = tuple(StepMeasurement.from_dict(m) for m in data["measurements"])
        if data.get("state") is not None:  # profiles written before sharding have none
            data["state"] = ModelState(**data["state"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        return cls.from_dict(json.loads(text))
