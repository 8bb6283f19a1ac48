"""A job's model on one device: peak memory and time per micro-batch, measured, fitted, verified.

The largest micro-batch is found by measuring and fitting, in at most
`MAX_MEASURED_STEPS` (4) real training steps, never by blind trial and error.
Each measured step gives the peak at b and its slope there (see `measure`).

peak(b) is modelled as the max of lines, as the real one is: the peak of a
step is the max over its moments of the live bytes, each linear in b, so it is
convex and piecewise linear (with AdamW(foreach=True) the optimizer step's
nearly flat line sets it at small b, activations at large b). The lines: the
chords between measured sizes, the tangent at the largest one, and the
optimizer step's line.

1. b = 1. Its micro-step peak bounds the bytes per sample: S <= P1 - (weights,
   gradients, optimizer state).
2. b2 = half the largest b that fits even under that bound (at least 2).
3. The largest b whose predicted peak fits the budget is measured, unless that is
   more than `MAX_EXTRAPOLATION` x beyond the largest measured size: then 2/3 of
   it is measured first, and the prediction is made again from there. (The peak
   may bend upwards past a size: a bend beyond the last measured size is invisible,
   so the answer is then at least the 2/3 point.)
4. If a size did not fit (out of memory, or over budget), refit with what it showed
   or bisect if it showed nothing. The answer is always a size that was measured.

budget = usable - headroom - reserve. *usable* is what torch may hold: on CUDA the
free memory after this process's context plus torch's own reserved memory, capped
by `set_per_process_memory_fraction`; a simulated device's declared memory; a
CPU's available RAM. The *reserve* is what the measurement cannot see: what the
process group takes, by its `backend` (DDP's gradient buckets for either; NCCL's
buffers for "nccl" only: a gloo group, e.g. several ranks on one GPU, holds its
buffers in host memory), the allocator's fragmentation (reserved minus allocated
at the peak, measured), and `extra_reserve_bytes`. The CUDA context is already
outside the free memory.

Profiles are cached on disk by what changes them (model, sample shape, precision,
optimizer, device type, torch version); a cache hit re-derives the largest
micro-batch for the current budget without running a step.

The profile also counts the model's state (`ModelState`): parameter and gradient
bytes from the model, optimizer state from a step of the optimizer on the model
built on the `meta` device (no memory; from the measured model if that fails),
and the sharding units' parameters. With it, `capacity(sharding=, world_size=)`
predicts what fits when the model is sharded over W ranks (`autobatch.planning.memory`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from autobatch.errors import NoFitError, ProbeError
from autobatch.planning.memory import MemoryModel, ModelState, Sharding
from autobatch.planning.plan import DeviceCapacity
from autobatch.probe import cache
from autobatch.probe.cache import PROFILE_FORMAT_VERSION
from autobatch.probe.devices import DeviceInfo, SimulatedDevice
from autobatch.probe.measure import (
    MakeOptimizer,
    StepMeasurement,
    StepRunner,
)
from autobatch.probe.peak import (
    PeakLine,
    largest_under,
    micro_lines,
    optimizer_line,
    peak_at,
    peak_lines,
)
from autobatch.step.precision import Precision, check_supported
from autobatch.step.shard import BlocksFn, repeated_blocks, unit_bytes
from autobatch.tasks.task import Task

MAX_MEASURED_STEPS = 4
DEFAULT_MAX_MICRO_BATCH = 4096
# NCCL communicator buffers per process: NCCL_BUFFSIZE (4 MiB) x channels x peers, plus
# its device-side structures; a few hundred MiB on typical nodes. A stated allowance.
NCCL_RESERVE_BYTES = 256 * 2**20
Backend = Literal["nccl", "gloo"]  # the process group's backend, for its reserve
BACKENDS = ("nccl", "gloo")
MAX_EXTRAPOLATION = 4  # predict at most 4x beyond the largest size that fitted, else go 2/3 way
CACHE_TOLERANCE = 0.10  # on a cache hit, predict above the largest measured size only past this


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
        self, info: DeviceInfo, *, headroom_fraction: float, time_scale: float
    ) -> ModelProfile:
        """This profile on another device of the job, one where a replica does not fit a
        sample (so nothing could be measured there) but a sharded model may: the memory
        lines and state are the model's, the budget the device's (its total memory less
        the headroom and this profile's reserve), the times times `time_scale` (how much
        slower the device is). Estimated, never verified."""
        usable = info.total_bytes
        headroom = int(headroom_fraction * usable)
        budget = usable - headroom - self.reserve_bytes
        return replace(
            self,
            device_name=info.name,
            device_uuid=info.uuid,
            usable_bytes=usable,
            headroom_bytes=headroom,
            budget_bytes=budget,
            max_micro_batch=largest_under(self.peak_lines, budget, self.micro_batch_cap),
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
        data["measurements"] = tuple(StepMeasurement(**m) for m in data["measurements"])
        if data.get("state") is not None:  # profiles written before sharding have none
            data["state"] = ModelState(**data["state"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------
# profiling


def profile_model(
    task: Task,
    device: DeviceInfo | SimulatedDevice,
    *,
    make_optimizer: MakeOptimizer,
    precision: Precision = "fp32",
    headroom_fraction: float = 0.05,
    headroom_bytes: int = 0,
    extra_reserve_bytes: int = 0,
    backend: Backend | None = None,
    max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH,
    cache_dir: str | os.PathLike | None = None,
    gradient_checkpointing: bool | None = False,
    shard_blocks: BlocksFn = repeated_blocks,
) -> ModelProfile:
    """Measure `task`'s model on `device` (<= 4 training steps) or reuse a cached profile.

    On CUDA this creates the context in the calling process: call it in the
    process that trains on the device. `backend` is the process group's that the job
    trains in (None: one process, no DDP): either reserves DDP's gradient buckets
    (gradient_as_bucket_view=False, the default), "nccl" also NCCL's buffers
    (`NCCL_RESERVE_BYTES`).
    `gradient_checkpointing=None`: without it, and with it (`Task.enable_gradient_checkpointing`)
    when micro-batch 1 does not fit without it.
    `shard_blocks`: the blocks a sharded job wraps one by one (`Sharded(blocks=)`), for
    the units in the profile's `state`.
    """
    if gradient_checkpointing is None:
        kwargs = dict(
            make_optimizer=make_optimizer, precision=precision,
            headroom_fraction=headroom_fraction, headroom_bytes=headroom_bytes,
            extra_reserve_bytes=extra_reserve_bytes, backend=backend,
            max_micro_batch=max_micro_batch, cache_dir=cache_dir, shard_blocks=shard_blocks,
        )  # fmt: skip
        try:
            return profile_model(task, device, gradient_checkpointing=False, **kwargs)
        except NoFitError:
            if task.enable_gradient_checkpointing is None:
                raise
        return profile_model(task, device, gradient_checkpointing=True, **kwargs)
    info = device.info() if isinstance(device, SimulatedDevice) else device
    check_supported(info, precision)
    if not 0 <= headroom_fraction < 1:
        raise ProbeError(f"headroom_fraction={headroom_fraction!r} must be in [0, 1)")
    checks = (("headroom_bytes", headroom_bytes), ("extra_reserve_bytes", extra_reserve_bytes))
    for name, value in checks:
        if value < 0:
            raise ProbeError(f"{name}={value!r} must be >= 0")
    if max_micro_batch < 1:
        raise ProbeError(f"max_micro_batch={max_micro_batch!r} must be >= 1")

    key_fields, grad_bytes = cache.key_fields(task, info, make_optimizer, precision)
    key_fields["gradient_checkpointing"] = gradient_checkpointing
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    static = [("extra", extra_reserve_bytes)] if extra_reserve_bytes else []
    static += comm_reserve(check_backend(backend), grad_bytes)
    usable = usable_bytes(info)
    headroom = int(headroom_fraction * usable) + headroom_bytes
    budgeter = _Budget(usable - headroom - sum(v for _, v in static))

    measurements = cache.load(cache_dir, key)
    cached = measurements is not None
    runner = None
    state = meta_model_state(task, make_optimizer, shard_blocks)
    if measurements is None:
        runner = StepRunner(
            task,
            info,
            make_optimizer=make_optimizer,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
        )
        try:
            measurements = _search(runner, budgeter, max_micro_batch)
            if state is None and runner.steps and any(not m.oom for m in measurements):
                state = model_state(runner.model, runner.state_bytes(), shard_blocks)
        finally:
            runner.close()
    if not cached:
        cache.store(cache_dir, key, key_fields, measurements)
    steps = runner.steps if runner else 0
    ok = [m for m in measurements if not m.oom]
    if not ok or not any(m.peak_bytes <= budgeter.of(measurements) for m in ok):
        need = _size(ok[0].peak_bytes) if ok else "more than the device has"
        raise NoFitError(
            f"{info.name}: one sample does not fit: a training step at micro-batch 1 needs {need}, "
            f"the budget is {_size(budgeter.of(measurements))} (usable "
            f"{_size(usable)} - headroom - reserve); lower the sequence length, use "
            "bf16/fp16, or use a device with more memory",
            measured_steps=steps,
        )
    return _conclude(
        measurements,
        budgeter,
        max_micro_batch,
        fresh=not cached,
        info=info,
        precision=precision,
        usable=usable,
        headroom=headroom,
        static=static,
        measured_steps=steps,
        key=key,
        gradient_checkpointing=gradient_checkpointing,
        state=state,
    )


def check_backend(backend: str | None) -> Backend | None:
    """`backend` if it is a process group's backend (None: one process), else a ProbeError."""
    if backend is not None and backend not in BACKENDS:
        raise ProbeError(f"backend={backend!r} must be one of {BACKENDS} or None (one process)")
    return backend


def comm_reserve(backend: Backend | None, gradient_bytes: int) -> list[tuple[str, int]]:
    """What a process group on `backend` holds on the device that a probe cannot see."""
    if backend is None:
        return []
    reserve = [("ddp_gradient_buckets", gradient_bytes)]
    if backend == "nccl":
        reserve.append(("nccl_buffers", NCCL_RESERVE_BYTES))
    return reserve


class _Budget:
    """The budget after the fragmentation measured so far (CUDA; zero elsewhere)."""

    def __init__(self, before_fragmentation: int) -> None:
        self.base = before_fragmentation

    @staticmethod
    def fragmentation(measurements: list[StepMeasurement] | tuple) -> int:
        return max((m.fragmentation_bytes for m in measurements), default=0)

    def of(self, measurements: list[StepMeasurement] | tuple) -> int:
        return self.base - self.fragmentation(measurements)


def _search(runner: StepRunner, budgeter: _Budget, cap: int) -> list[StepMeasurement]:
    """The measured steps (see the module docstring); the answer is the largest that fitted."""
    done: list[StepMeasurement] = []
    good, bad = 0, cap + 1  # largest size that fitted, smallest that did not
    for step in range(MAX_MEASURED_STEPS):
        if step >= 1 and good == 0:  # one sample does not fit
            break
        budget = budgeter.of(done)
        ok = [m for m in done if not m.oom]
        if step == 0:
            b = 1
        elif step == 1:  # what surely fits if every byte above the weights grew with b
            per_sample_bound = max(1, ok[0].micro_peak_bytes - runner.entry_bytes())
            b = max(2, (1 + (budget - ok[0].peak_bytes) // per_sample_bound) // 2)
        elif done[-1].oom or len(ok) < 2:  # the fit over-promised and learnt nothing: bisect
            b = (good + bad) // 2
        else:
            b = min(largest_under(peak_lines(ok), budget, cap), bad - 1)
            if step < MAX_MEASURED_STEPS - 1 and b > MAX_EXTRAPOLATION * good:
                b = max(good + 1, b * 2 // 3)  # measure 2/3 of the way first: peak may bend up
        b = min(b, bad - 1)
        if b <= good:
            break
        predicted = peak_at(peak_lines(ok), b) if len(ok) >= 2 else None
        m = runner.run(b, predicted_peak_bytes=predicted)
        done.append(m)
        if not m.oom and m.peak_bytes <= budgeter.of(done):
            good = b
        else:
            bad = b
    return done


def _conclude(
    measurements: list[StepMeasurement],
    budgeter: _Budget,
    cap: int,
    *,
    fresh: bool,
    info: DeviceInfo,
    precision: str,
    usable: int,
    headroom: int,
    static: list[tuple[str, int]],
    measured_steps: int,
    key: str,
    gradient_checkpointing: bool,
    state: ModelState | None,
) -> ModelProfile:
    ok = [m for m in measurements if not m.oom]
    budget = budgeter.of(measurements)
    lines = peak_lines(ok)
    best = max((m.micro_batch for m in ok if m.peak_bytes <= budget), default=0)
    best = min(best, cap)
    predicted = largest_under(lines, budget, cap)
    use_prediction = not fresh and predicted > best * (1 + CACHE_TOLERANCE)
    max_b = predicted if use_prediction else best
    if max_b < 1:
        raise ProbeError(f"{info.name}: no micro-batch fits the budget of {budget} bytes")
    later = ok[1:] or ok  # the first step warms up and creates the optimizer state
    times = [(m.micro_batch, m.micro_step_s) for m in later]
    times += [(m.low_micro_batch, m.low_step_s) for m in later if m.low_micro_batch]
    fixed_s, per_sample_s = _time_line(times)
    unpaced = [m.micro_step_s * info.speed / m.forward_s for m in ok if m.forward_s > 0]
    frag = _Budget.fragmentation(measurements)
    return ModelProfile(
        device_name=info.name,
        device_uuid=info.uuid,
        precision=precision,
        usable_bytes=usable,
        headroom_bytes=headroom,
        reserve=tuple(static) + ((("fragmentation", frag),) if frag else ()),
        budget_bytes=budget,
        peak_lines=lines,
        fixed_s=fixed_s,
        per_sample_s=per_sample_s,
        step_overhead_s=statistics.median(m.optimizer_s for m in later),
        backward_factor=max(1.0, statistics.median(unpaced)) if unpaced else 3.0,
        max_micro_batch=max_b,
        verified=not use_prediction,
        measurements=tuple(measurements),
        measured_steps=measured_steps,
        cached=not fresh,
        simulated=info.simulated,
        cache_key=key,
        gradient_checkpointing=gradient_checkpointing,
        state=state,
        micro_batch_cap=cap,
    )


def _time_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares t = a + c*b with a, c >= 0 (one point: all of it per sample)."""
    bs = [b for b, _ in points]
    if len(set(bs)) < 2:
        return 0.0, sum(t / b for b, t in points) / len(points)
    mb, mt = statistics.fmean(bs), statistics.fmean(t for _, t in points)
    c = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b in bs)
    if c <= 0:  # timing noise at tiny sizes: time does not grow measurably with b
        return mt, 0.0
    a = mt - c * mb
    if a < 0:
        return 0.0, sum(t for _, t in points) / sum(bs)
    return a, c


# ---------------------------------------------------------------------------
# the model's state, for sharding


def model_state(
    model: nn.Module, optimizer_bytes: int, blocks: BlocksFn = repeated_blocks
) -> ModelState:
    """Parameter and gradient bytes of `model` (each parameter once), its optimizer's
    state bytes as given, and its sharding units as `Sharded(blocks=blocks)` wraps them
    (each block, then the root with the rest)."""
    params = {id(p): p for p in model.parameters()}
    largest, root = unit_bytes(model, blocks)
    return ModelState(
        params_bytes=_nbytes(params.values()),
        grads_bytes=_nbytes(p for p in params.values() if p.requires_grad),
        optimizer_bytes=optimizer_bytes,
        largest_unit_bytes=largest,
        root_unit_bytes=root,
    )


def meta_model_state(
    task: Task, make_optimizer: MakeOptimizer, blocks: BlocksFn = repeated_blocks
) -> ModelState | None:
    """`model_state` of the task's model built on the `meta` device (no memory), its
    optimizer state counted after one step there; None when the model or its optimizer
    cannot run on `meta` (e.g. fused kernels). Step counters the optimizer keeps on the
    host (Adam's, unless capturable) are not device memory and are not counted."""
    try:
        with torch.device("meta"):
            model = task.build_model()
        optimizer = make_optimizer(model)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    except Exception:  # any failure here only means: count it on the measured model instead
        return None
    tensors = (v for st in optimizer.state.values() for v in st.values())
    on_meta = [v for v in tensors if isinstance(v, torch.Tensor) and v.is_meta]
    return model_state(model, _nbytes(on_meta), blocks)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def usable_bytes(info: DeviceInfo) -> int:
    """Bytes torch may hold on the device for this job (see the module docstring)."""
    if info.simulated:
        return info.total_bytes
    if info.is_cuda:
        dev = torch.device(info.torch_device)
        free, total = torch.cuda.mem_get_info(dev)  # creates the context: this process trains
        usable = free + torch.cuda.memory_reserved(dev)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:
            usable = min(usable, int(fraction(dev) * total))
        return usable
    return info.free_bytes


def _size(n: float) -> str:
    """Bytes for a message: MiB, or KiB below one MiB (a tiny simulated device)."""
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"
