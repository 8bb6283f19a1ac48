"""Checkpoints written in the background: the training loop copies its state to host memory
and goes on while a thread writes it.

    to_host(state)                       a deep copy whose tensors are on the CPU (a clone there)
    PendingSave.start(write)             `write()` in a thread; its result is the checkpoint
    PendingSave.of(future)               a future's (torch.distributed.checkpoint.async_save's)
    PendingSave.finished(path)           a save already written (the synchronous mode)
    pending.then(fn, fault=...)          fn(path) once written, still in the background; an
                                         error mapped by `fault` (a StorageError) on the way
    pending.wait()                       the checkpoint once complete, or the write's error
    pending.write_s                      how long the write took after the copy (None: running)

The caller keeps one save in flight: it waits for the previous one before it copies the
next, so two writes never overlap and an error surfaces at the next save at the latest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch.utils._pytree import tree_map


def to_host(state: Any) -> Any:
    """`state` with every container rebuilt and every tensor copied to host memory: what the
    training loop changes next cannot reach the copy."""
    return tree_map(
        lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, state
    )


class PendingSave:
    """A checkpoint being written; `wait()` gives its location once complete."""

    def __init__(self, future: Future, started: float | None = None) -> None:
        self.future = future
        self.started = time.perf_counter() if started is None else started
        self.write_s: float | None = None
        future.add_done_callback(self._timed)

    def _timed(self, _: Future) -> None:
        self.write_s = time.perf_counter() - self.started

    @classmethod
    def start(cls, write: Callable[[], Any]) -> PendingSave:
        """`write()` in a daemon thread (a process that ends does not wait for it: a write
        that never finished leaves an incomplete checkpoint, which never counts)."""
        future: Future = Future()
        future.set_running_or_notify_cancel()

        def run() -> None:
            try:
                future.set_result(write())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)

        threading.Thread(target=run, name="checkpoint-write", daemon=True).start()
        return cls(future)

    @classmethod
    def of(cls, future: Future) -> PendingSave:
        return cls(future)

    @classmethod
    def finished(cls, result: Any) -> PendingSave:
        future: Future = Future()
        future.set_result(result)
        return cls(future)

    def then(
        self,
        fn: Callable[[Any], Any],
        *,
        fault: Callable[[BaseException], BaseException | None] = lambda exc: None,
    ) -> PendingSave:
        """A save that completes once this one has and `fn(result)` has run (in the thread
        that completed this one; at once when it is done). An error of either is replaced by
        `fault(error)` when that gives one."""
        chained: Future = Future()
        chained.set_running_or_notify_cancel()

        def after(done: Future) -> None:
            try:
                chained.set_result(fn(done.result()))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                mapped = fault(exc)
                if mapped is not None and mapped is not exc:
                    mapped.__cause__ = exc
                chained.set_exception(mapped or exc)

        self.future.add_done_callback(after)
        return PendingSave(chained, self.started)

    def done(self) -> bool:
        return self.future.done()

    def wait(self, timeout: float | None = None) -> Any:
        """The checkpoint's location once complete; raises the write's error."""
        return self.future.result(timeout)
