"""Exact tensor-memory accounting, and the rules that make a CPU act like a smaller, slower GPU.

`TensorMemory` is a small `TorchDispatchMode` that counts the bytes of every
live tensor storage it has seen: the model's parameters, gradients, buffers and
optimizer state alive when it is entered, plus every storage an op creates
inside it. A storage leaves the count when torch frees it (a weakref callback
on the storage's Python object, which torch keeps alive exactly as long as the
C++ storage). This is torch's own tensor accounting, not process RSS: on a CPU
it gives the same peak as `MemTracker` and costs one Python call per op.

Given a limit, it raises `torch.OutOfMemoryError` (the type CUDA raises) from
inside the op that pushes live memory past it, so a simulated device runs out
of memory where a real one would, and training code recovers the same way.

`Pacer` makes a device `speed` times as fast as the machine (speed <= 1): it
sleeps `elapsed * (1/speed - 1)` after the work it times; `slow_down` changes
its speed while it runs (the `slow` fault of a drill). In a training loop,
wrap the loss function (`pacer.wrap_loss_fn`: forward time x the measured
(forward+backward)/forward ratio) and hook the optimizer (`pacer.attach`).
Neither ever times a collective: DDP's all-reduce runs inside backward, after
the forward, and before `optimizer.step()`, so a fast rank waiting for a slow
one is never slowed down for having waited.
"""

from __future__ import annotations

import collections
import contextlib
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch.errors import ProbeError


def training_tensors(
    model: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> Iterator[torch.Tensor]:
    """The tensors a training step finds alive: parameters, gradients, buffers, optimizer state."""
    if model is not None:
        for p in model.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class TensorMemory(TorchDispatchMode):
    """Counts live tensor bytes on one device type while active; optionally enforces a limit.

    >>> mem = TensorMemory(limit_bytes=512 * 2**20, model=model, optimizer=opt)
    >>> with mem:          # around a whole optimizer step
    ...     acc.step(micro_batches, loss_fn, global_items=n)
    >>> mem.peak_bytes

    The object is reusable: every entry starts a fresh count from the model's and
    optimizer's tensors (and `extra`, e.g. micro-batches built beforehand).
    """

    def __init__(
        self,
        limit_bytes: int | None = None,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        extra: Iterable[torch.Tensor] = (),
        device_type: str = "cpu",
    ) -> None:
        super().__init__()
        if limit_bytes is not None and limit_bytes < 1:
            raise ProbeError(f"limit_bytes={limit_bytes!r} must be >= 1 or None")
        self.limit_bytes = limit_bytes
        self.device_type = device_type
        self._model, self._optimizer, self._extra = model, optimizer, tuple(extra)
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (weakref, bytes)
        # Storages die wherever torch drops them (also on other threads, and inside
        # garbage collection): their callbacks only queue the key; the count changes
        # here, in the thread that runs the ops, before any new storage is looked up
        # (a dead storage's id may be reused by the next one).
        self._dead: collections.deque[int] = collections.deque()
        # Storages an op wrote into (out=) or that changed size: FSDP2 allocates and frees
        # its gathered parameters with `untyped_storage().resize_()`, which no op sees.
        # A missed free only over-counts, so these are re-read before the count can set a
        # new peak or cross the limit (re-reading after every op halved sharded steps).
        self._watched: set[int] = set()
        self._bytes = 0
        self.peak_bytes = 0

    # -- counting -------------------------------------------------------------
    @property
    def live_bytes(self) -> int:
        self._drain()
        self._reread_watched()
        return self._bytes

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count these tensors' storages (once each) from now until torch frees them."""
        self._drain()
        for t in tensors:
            self._add(t)
        self._reread_watched()
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def reset_peak(self) -> None:
        """Start a new peak from the live bytes (as torch.cuda.reset_peak_memory_stats does)."""
        self.peak_bytes = self.live_bytes

    def _drain(self) -> None:
        while self._dead:
            key = self._dead.popleft()
            self._watched.discard(key)
            entry = self._live.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def _reread_watched(self) -> None:
        for key in self._watched:
            ref, counted = self._live[key]
            st = ref()
            if st is not None and st.nbytes() != counted:
                self._live[key] = (ref, st.nbytes())
                self._bytes += st.nbytes() - counted

    def _add(self, t: torch.Tensor, *, watch: bool = False) -> None:
        if isinstance(t, DTensor):  # a sharded parameter: what this rank holds is its shard
            t = t._local_tensor
        if t.device.type != self.device_type or t.is_sparse:
            return
        st = t.untyped_storage()
        key = id(st)
        entry = self._live.get(key)
        nbytes = st.nbytes()
        if entry is None:
            self._live[key] = (weakref.ref(st, self._freed(key)), nbytes)
            self._bytes += nbytes
        elif entry[1] != nbytes:  # resized in place
            self._live[key] = (entry[0], nbytes)
            self._bytes += nbytes - entry[1]
            watch = True
        if watch:
            self._watched.add(key)

    def _freed(self, key: int) -> Callable[[weakref.ref], None]:
        dead = self._dead
        return lambda _ref: dead.append(key)  # deque.append is atomic

    # -- the mode -------------------------------------------------------------
    def __enter__(self) -> TensorMemory:
        self._reset()
        self.track(training_tensors(self._model, self._optimizer))
        self.track(self._extra)
        if self.limit_bytes is not None and self._bytes > self.limit_bytes:
            live = self._bytes
            self._reset()
            self._raise_oom(live, "on entry (model, gradients and optimizer state alone)")
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._drain()
        self._live.clear()  # drops the weakrefs: no callback fires for them afterwards
        self._watched.clear()

    def _reset(self) -> None:
        self._live.clear()
        self._dead.clear()
        self._watched.clear()
        self._bytes = self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._drain()
        for t in _tensors(out):
            self._add(t)
        for t in _tensors(kwargs.get("out")):  # also ops that return nothing (FSDP2's copy-out)
            self._add(t, watch=True)
        if self._bytes > self.peak_bytes or (
            self.limit_bytes is not None and self._bytes > self.limit_bytes
        ):
            self._reread_watched()
        if self._bytes > self.peak_bytes:
            self.peak_bytes = self._bytes
        if self.limit_bytes is not None and self._bytes > self.limit_bytes:
            del out  # the op's outputs die with this frame
            self._raise_oom(self._bytes, f"in {func}")
        return out

    def _raise_oom(self, live: int, where: str) -> None:
        raise torch.OutOfMemoryError(
            f"simulated device out of memory {where}: {live / 2**20:.2f} MiB of tensors live, "
            f"limit {self.limit_bytes / 2**20:.2f} MiB"
        )


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's outputs: a tensor, or (nested) tuples and lists of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


class Pacer:
    """Slows the work it times to `speed` x the machine's speed (0 < speed <= 1).

    `backward_factor` is (forward + backward) / forward time, used only by
    `wrap_loss_fn`, which sees the forward alone; `profile_model` measures it.
    """

    def __init__(self, speed: float, *, backward_factor: float = 3.0) -> None:
        if not (0 < speed <= 1):
            raise ProbeError(
                f"speed={speed!r} must be in (0, 1]: speeds are relative to the fastest device "
                "of the job (use normalise_speeds) so that no delay is negative"
            )
        if not backward_factor >= 1:
            raise ProbeError(f"backward_factor={backward_factor!r} must be >= 1")
        self.speed = self.made_speed = speed
        self.backward_factor = backward_factor
        self.slept_s = 0.0
        self.timed_s = 0.0  # the work it measured (and stretched by `factor`)

    def slow_down(self, factor: float) -> None:
        """Run at `factor` x the speed it was made with, from now on (0 < factor <= 1): a
        device that throttles, or is shared, after it was probed."""
        if not (0 < factor <= 1):
            raise ProbeError(f"factor={factor!r} must be in (0, 1]: a Pacer can only slow")
        self.speed = self.made_speed * factor

    def _sleep(self, elapsed_s: float, factor: float = 1.0) -> None:
        self.timed_s += elapsed_s * factor
        delay = elapsed_s * factor * (1.0 / self.speed - 1.0)
        if delay > 0:
            time.sleep(delay)
            self.slept_s += delay

    @contextlib.contextmanager
    def micro_step(self) -> Iterator[None]:
        """Time the block (a whole forward+backward, or an optimizer step) and stretch it."""
        t0 = time.perf_counter()
        yield
        self._sleep(time.perf_counter() - t0)

    def wrap_loss_fn(
        self, loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    ) -> Callable[[nn.Module, Any], torch.Tensor]:
        """The loss function, paced for forward *and* the backward that follows it.

        Sleeps before returning, so before backward and hence before any all-reduce.
        """

        def paced(model: nn.Module, batch: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            loss = loss_fn(model, batch)
            self._sleep(time.perf_counter() - t0, self.backward_factor)
            return loss

        return paced

    def attach(self, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        """Pace every `optimizer.step()`; returns a function that detaches the hooks."""
        started: list[float] = []

        def pre(*_: Any) -> None:
            started.append(time.perf_counter())

        def post(*_: Any) -> None:
            self._sleep(time.perf_counter() - started.pop())

        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        return lambda: [h.remove() for h in handles] and None
