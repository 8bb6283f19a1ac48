"""Run one real training step of a task on one device and measure it.

A measured step is what training does with accumulation, one micro-batch on
the device at a time: micro-batches of b (several) then b_lo = b - max(1, b // 4)
(several) worst-case samples, each forward + backward, then the optimizer step.
The micro-steps after the first run with gradients alive (the peak of an
accumulating step); b and b_lo together give the peak at b *and* its slope there
(bytes per extra sample), so one step yields a tangent of peak(b), not a point.
The optimizer step's peak is reported apart: with AdamW(foreach=True) it is the
larger one at small b.

Timing: a shape's first micro-steps pay for kernel selection, allocator growth and
first touches, which later steps at that shape never pay (on an H200 they made the
fitted per-sample cost zero). So every size is warmed before it is timed: the first
micro-step of b (the one without gradients) is never timed, and b_lo runs
`WARM_UP_RUNS` untimed micro-steps when this runner has not run its shape yet. Then
`TIMED_RUNS` micro-steps of each size are timed and the median is the size's time
(the runs themselves are kept). On CUDA the device is synchronised before and after
every timed region, so the time is the work's, not its launch's. Warm-ups are extra
micro-steps inside the same measured step, not extra steps. Also timed: the forward
alone (median) and the optimizer step.

Memory is measured with torch's own accounting: the CUDA caching allocator's
peak on a GPU (plus its reserved peak, to see fragmentation); `TensorMemory`
on a CPU, which on a simulated device also enforces the declared memory.
Simulated devices are paced to their speed.

An out-of-memory error (the real one or the simulated one) is recovered
outside the except block: the traceback pins the failed step's tensors.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autobatch.errors import ProbeError
from autobatch.probe.devices import DeviceInfo
from autobatch.probe.simulated import Pacer, TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.step.precision import Precision, check_supported
from autobatch.tasks.task import Task

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]

WARM_UP_RUNS = 1  # untimed micro-steps of a shape this runner has not run yet
TIMED_RUNS = 3  # timed micro-steps per size; the size's time is their median


def now() -> float:
    """The probe's clock (seconds). A module function, so that a test can plant a
    deterministic cost model (tests/test_profile.py)."""
    return time.perf_counter()


@dataclass(frozen=True)
class StepMeasurement:
    """One measured training step at micro-batch size `micro_batch` (bytes and seconds)."""

    micro_batch: int
    oom: bool
    micro_peak_bytes: int | None = None  # peak of the micro-steps of b (forward + backward)
    low_micro_batch: int | None = None  # b_lo of the last micro-step (None when b = 1)
    low_peak_bytes: int | None = None  # its peak
    optimizer_peak_bytes: int | None = None  # peak during optimizer.step()
    reserved_peak_bytes: int | None = None  # CUDA: allocator's reserved peak (fragmentation)
    micro_step_s: float | None = None  # median of the warm micro-steps of b (paced if simulated)
    low_step_s: float | None = None  # median of the warm b_lo micro-steps
    forward_s: float | None = None  # median forward alone of b's timed micro-steps (unpaced)
    optimizer_s: float | None = None
    predicted_peak_bytes: int | None = None  # what the fit said before this step ran
    micro_step_runs_s: tuple[float, ...] = ()  # each timed micro-step of b
    low_step_runs_s: tuple[float, ...] = ()  # each timed micro-step of b_lo

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepMeasurement:
        """From `dataclasses.asdict` through JSON (the timed runs back to tuples)."""
        runs = {k: tuple(data.get(k) or ()) for k in ("micro_step_runs_s", "low_step_runs_s")}
        return cls(**{**data, **runs})

    @property
    def peak_bytes(self) -> int | None:
        if self.oom:
            return None
        return max(self.micro_peak_bytes, self.optimizer_peak_bytes)

    @property
    def slope_bytes(self) -> float | None:
        """Bytes per extra sample at b (from the b and b_lo micro-steps)."""
        if self.oom or self.low_micro_batch is None:
            return None
        return (self.micro_peak_bytes - self.low_peak_bytes) / (
            self.micro_batch - self.low_micro_batch
        )

    @property
    def fragmentation_bytes(self) -> int:
        if self.oom or self.reserved_peak_bytes is None:
            return 0
        return max(0, self.reserved_peak_bytes - self.peak_bytes)


def low_size(b: int) -> int | None:
    """The smaller micro-batch measured with b, for the slope at b."""
    return b - max(1, b // 4) if b > 1 else None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested dict / list / tuple) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _CudaMeter:
    """Peaks from the CUDA caching allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        torch.cuda.empty_cache()  # so that reserved memory reflects this step only
        torch.cuda.reset_peak_memory_stats(self.device)
        yield

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reserved_peak(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device)


class _TensorMeter:
    """Peaks from live tensor storages; on a simulated device, its memory is enforced."""

    def __init__(self, memory: TensorMemory) -> None:
        self.memory = memory

    def step(self) -> contextlib.AbstractContextManager:
        return self.memory

    def sync(self) -> None:
        pass

    def reset_peak(self) -> None:
        self.memory.reset_peak()

    def peak(self) -> int:
        return self.memory.peak_bytes

    def reserved_peak(self) -> int | None:
        return None


class StepRunner:
    """Owns a fresh model and optimizer on one device and runs measured training steps."""

    def __init__(
        self,
        task: Task,
        device: DeviceInfo,
        *,
        make_optimizer: MakeOptimizer,
        precision: Precision = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        if device.torch_device is None:
            raise ProbeError(
                f"{device.name} ({device.uuid}) is not visible to this process "
                "(CUDA_VISIBLE_DEVICES): probe it from the process that owns it"
            )
        check_supported(device, precision)
        self.task, self.info, self.precision = task, device, precision
        self.device = torch.device(device.torch_device)
        self.model = task.build_model().to(self.device)
        if gradient_checkpointing:
            task.checkpoint_activations(self.model)
        self.model.train()
        self.optimizer = make_optimizer(self.model)
        # The training step itself, on one rank: what is measured is what trains.
        self.accumulator = Accumulator(self.model, self.optimizer, precision=precision)
        if self.device.type == "cuda":
            self.meter: _CudaMeter | _TensorMeter = _CudaMeter(self.device)
        else:
            limit = device.total_bytes if device.simulated else None
            self.meter = _TensorMeter(
                TensorMemory(limit, model=self.model, optimizer=self.optimizer)
            )
        self.pacer = Pacer(device.speed) if device.simulated and device.speed != 1.0 else None
        self.steps = 0
        self.warm: set[int] = set()  # micro-batch sizes this runner has run (warm shapes)

    def _paced(self) -> contextlib.AbstractContextManager:
        return self.pacer.micro_step() if self.pacer else contextlib.nullcontext()

    def run(self, micro_batch: int, *, predicted_peak_bytes: int | None = None) -> StepMeasurement:
        """One training step at `micro_batch` (see the module docstring); out of memory is a
        result, not an error."""
        self.steps += 1
        result = None
        with contextlib.suppress(torch.OutOfMemoryError):  # recover below, outside the handler:
            result = self._step(micro_batch)  # its traceback pins the failed step's tensors
        if result is None:
            self.recover()
            result = {"oom": True}
        return StepMeasurement(micro_batch, predicted_peak_bytes=predicted_peak_bytes, **result)

    def recover(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _micro_step(self, size: int, weight: float) -> tuple[int, int | None, float, float]:
        """Forward + backward of one micro-batch of `size`: (peak, reserved peak, seconds,
        forward seconds). The micro-batch lives on the device only during its micro-step;
        it is made on the host before the clock starts (the loader's work, not the step's)."""
        m = self.meter
        host = self.task.probe_batch(size)
        m.reset_peak()
        m.sync()
        t0 = now()
        forward_s = 0.0

        def forward_done() -> None:
            nonlocal forward_s
            m.sync()
            forward_s = now() - t0

        with self._paced():
            mb = to_device(host, self.device)
            self.accumulator.micro_step(
                mb, self.task.loss_fn, weight=weight, after_forward=forward_done
            )
            del mb
            m.sync()
        seconds = now() - t0
        self.warm.add(size)
        return m.peak(), m.reserved_peak(), seconds, forward_s

    def _sizes(self, b: int, lo: int | None) -> list[tuple[int, bool]]:
        """The step's micro-batches as (size, timed): b's first micro-step (no gradients
        alive yet) and the warm-ups of a shape not run before are not timed."""
        sizes = [(b, False)] * max(1, 0 if b in self.warm else WARM_UP_RUNS)
        sizes += [(b, True)] * TIMED_RUNS
        if lo:
            sizes += [(lo, False)] * (0 if lo in self.warm else WARM_UP_RUNS)
            sizes += [(lo, True)] * TIMED_RUNS
        return sizes

    def _step(self, b: int) -> dict[str, Any]:
        m, lo = self.meter, low_size(b)
        sizes = self._sizes(b, lo)
        weight = 1.0 / sum(size for size, _ in sizes)
        state_before = self.state_bytes()
        with m.step():
            runs = [(size, timed, *self._micro_step(size, weight)) for size, timed in sizes]
            m.reset_peak()
            t0 = now()
            with self._paced():
                self.accumulator.update()
                m.sync()
            optimizer_s = now() - t0
            optimizer_peak = m.peak()
            reserved = [r[3] for r in runs] + [m.reserved_peak()]
        # A lazily built optimizer state (Adam's moments) is born in the first step;
        # in every later step it is alive during the micro-steps too.
        born = self.state_bytes() - state_before
        at_b = [r for r in runs if r[0] == b]
        at_lo = [r for r in runs if r[0] == lo]
        timed_b = tuple(r[4] for r in at_b if r[1])
        timed_lo = tuple(r[4] for r in at_lo if r[1])
        return {
            "oom": False,
            "micro_peak_bytes": max(r[2] for r in at_b) + born,
            "low_micro_batch": lo,
            "low_peak_bytes": max(r[2] for r in at_lo) + born if lo else None,
            "optimizer_peak_bytes": optimizer_peak,
            "reserved_peak_bytes": None if reserved[0] is None else max(reserved),
            "micro_step_s": statistics.median(timed_b),
            "low_step_s": statistics.median(timed_lo) if lo else None,
            "forward_s": statistics.median([r[5] for r in at_b if r[1]]),
            "optimizer_s": optimizer_s,
            "micro_step_runs_s": timed_b,
            "low_step_runs_s": timed_lo,
        }

    def entry_bytes(self) -> int:
        """Parameters, their gradients and the optimizer state: a floor of the micro-steps'
        peak at any micro-batch size (after the first step has built the state)."""
        params = list(self.model.parameters())
        weights = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in params)
        return weights + self.state_bytes()

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state tensors (each storage once)."""
        storages = {
            id(v.untyped_storage()): v.untyped_storage().nbytes()
            for state in self.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        }
        return sum(storages.values())

    def close(self) -> None:
        """Free the model and optimizer (and, on a GPU, the allocator's cache)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model = self.optimizer = self.meter = self.accumulator = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
