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

The time line per micro-step is fitted to every measured size's median warm time
(`autobatch.probe.time_fit`: Theil-Sen, never a negative slope); when the fit cannot be
trusted the profile says so (`time_trusted`, `time_note`) and so does the plan's notes.
Warm-ups are micro-steps inside a measured step: they never add a step.

The budget each size must fit is the device's usable memory less the headroom and
what the probe cannot see (`autobatch.probe.budget`). Profiles are cached on disk by
what changes them (model, sample shape, precision, optimizer, device type, torch
version, the search's cap `max_micro_batch`: a job's is its global batch); a cache hit
re-derives the largest micro-batch for the current budget without running a step.

The profile also counts the model's state (`autobatch.probe.model_state`), so that
`ModelProfile.capacity(sharding=, world_size=)` predicts what fits when the model is
sharded over W ranks (`autobatch.planning.memory`). The profile itself, a value, is
`autobatch.probe.model_profile.ModelProfile`; its names are importable from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics

from autobatch.errors import NoFitError, ProbeError
from autobatch.planning.memory import ModelState
from autobatch.probe import cache
from autobatch.probe.budget import (
    NCCL_RESERVE_BYTES,
    Backend,
    Budget,
    check_backend,
    comm_reserve,
    usable_bytes,
)
from autobatch.probe.devices import DeviceInfo, SimulatedDevice
from autobatch.probe.measure import MakeOptimizer, StepMeasurement, StepRunner
from autobatch.probe.model_profile import DEFAULT_MAX_MICRO_BATCH, MAX_EXTRAPOLATION, ModelProfile
from autobatch.probe.model_state import meta_model_state, model_state
from autobatch.probe.peak import largest_under, peak_at, peak_lines
from autobatch.probe.time_fit import fit_time_line
from autobatch.step.precision import Precision, check_supported
from autobatch.step.shard import BlocksFn, repeated_blocks
from autobatch.tasks.task import Task

__all__ = [  # the profile's value, budget and state, importable from here as before
    "CACHE_TOLERANCE",
    "DEFAULT_MAX_MICRO_BATCH",
    "MAX_EXTRAPOLATION",
    "MAX_MEASURED_STEPS",
    "NCCL_RESERVE_BYTES",
    "Backend",
    "ModelProfile",
    "check_backend",
    "comm_reserve",
    "meta_model_state",
    "model_state",
    "profile_model",
    "usable_bytes",
]

MAX_MEASURED_STEPS = 4
CACHE_TOLERANCE = 0.10  # on a cache hit, predict above the largest measured size only past this


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
    measure: bool = True,
) -> ModelProfile | None:
    """Measure `task`'s model on `device` (<= 4 training steps) or reuse a cached profile.

    On CUDA this creates the context in the calling process: call it in the
    process that trains on the device. `backend` is the process group's that the job
    trains in (None: one process, no DDP): either reserves DDP's gradient buckets
    (gradient_as_bucket_view=False, the default), "nccl" also NCCL's buffers
    (`NCCL_RESERVE_BYTES`).
    `gradient_checkpointing=None`: without it, and with it (`Task.enable_gradient_checkpointing`)
    when micro-batch 1 does not fit without it.
    `max_micro_batch`: the largest micro-batch the search tries; a job passes its global
    batch, the most a rank can ever take in one micro-step, so it never measures sizes it
    cannot use (the cap is part of the cache key: a profile searched under a smaller cap
    says nothing verified beyond it).
    `shard_blocks`: the blocks a sharded job wraps one by one (`Sharded(blocks=)`), for
    the units in the profile's `state`. `measure=False`: the cached profile only, None
    when there is none (a lookup that runs no step, so several may run at once).
    """
    if gradient_checkpointing is None:
        kwargs = dict(
            make_optimizer=make_optimizer, precision=precision,
            headroom_fraction=headroom_fraction, headroom_bytes=headroom_bytes,
            extra_reserve_bytes=extra_reserve_bytes, backend=backend,
            max_micro_batch=max_micro_batch, cache_dir=cache_dir, shard_blocks=shard_blocks,
            measure=measure,
        )  # fmt: skip
        try:
            return profile_model(task, device, gradient_checkpointing=False, **kwargs)
        except NoFitError:
            if task.enable_gradient_checkpointing is None:
                raise
        return profile_model(task, device, gradient_checkpointing=True, **kwargs)
    info = device.info() if isinstance(device, SimulatedDevice) else device
    check_supported(info, precision)
    _check_settings(headroom_fraction, headroom_bytes, extra_reserve_bytes, max_micro_batch)
    key_fields, grad_bytes = cache.key_fields(task, info, make_optimizer, precision)
    key_fields["gradient_checkpointing"] = gradient_checkpointing
    key_fields["max_micro_batch"] = max_micro_batch  # the search's cap: what was measured
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    static = [("extra", extra_reserve_bytes)] if extra_reserve_bytes else []
    static += comm_reserve(check_backend(backend), grad_bytes)
    usable = usable_bytes(info)
    headroom = int(headroom_fraction * usable) + headroom_bytes
    budgeter = Budget(usable - headroom - sum(v for _, v in static))

    measurements = cache.load(cache_dir, key)
    cached = measurements is not None
    if not cached and not measure:
        return None
    state = meta_model_state(task, make_optimizer, shard_blocks)
    steps = 0
    if measurements is None:
        runner = StepRunner(
            task,
            info,
            make_optimizer=make_optimizer,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
        )
        measurements, state = _measure(runner, budgeter, max_micro_batch, state, shard_blocks)
        steps = runner.steps
        cache.store(cache_dir, key, key_fields, measurements)
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


def _check_settings(
    headroom_fraction: float, headroom_bytes: int, extra_reserve_bytes: int, max_micro_batch: int
) -> None:
    if not 0 <= headroom_fraction < 1:
        raise ProbeError(f"headroom_fraction={headroom_fraction!r} must be in [0, 1)")
    checks = (("headroom_bytes", headroom_bytes), ("extra_reserve_bytes", extra_reserve_bytes))
    for name, value in checks:
        if value < 0:
            raise ProbeError(f"{name}={value!r} must be >= 0")
    if max_micro_batch < 1:
        raise ProbeError(f"max_micro_batch={max_micro_batch!r} must be >= 1")


def _measure(
    runner: StepRunner,
    budgeter: Budget,
    cap: int,
    state: ModelState | None,
    blocks: BlocksFn,
) -> tuple[list[StepMeasurement], ModelState | None]:
    """The measured steps, and the model's state (counted on the measured model when the
    `meta` count failed); the runner is closed afterwards."""
    try:
        measurements = _search(runner, budgeter, cap)
        if state is None and runner.steps and any(not m.oom for m in measurements):
            state = model_state(runner.model, runner.state_bytes(), blocks)
    finally:
        runner.close()
    return measurements, state


def _search(runner: StepRunner, budgeter: Budget, cap: int) -> list[StepMeasurement]:
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
    budgeter: Budget,
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
    later = ok[1:] or ok  # the first optimizer step creates the optimizer state
    # Every size's time is the median of warm micro-steps (measure.py): the first step's too.
    times = [(m.micro_batch, m.micro_step_s) for m in ok]
    times += [(m.low_micro_batch, m.low_step_s) for m in ok if m.low_micro_batch]
    fit = fit_time_line(times)
    unpaced = [m.micro_step_s * info.speed / m.forward_s for m in ok if m.forward_s > 0]
    frag = Budget.fragmentation(measurements)
    return ModelProfile(
        device_name=info.name,
        device_uuid=info.uuid,
        precision=precision,
        usable_bytes=usable,
        headroom_bytes=headroom,
        reserve=tuple(static) + ((("fragmentation", frag),) if frag else ()),
        budget_bytes=budget,
        peak_lines=lines,
        fixed_s=fit.fixed_s,
        per_sample_s=fit.per_sample_s,
        time_trusted=fit.trusted,
        time_note=fit.note,
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


def _size(n: float) -> str:
    """Bytes for a message: MiB, or KiB below one MiB (a tiny simulated device)."""
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"
