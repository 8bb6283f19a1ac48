"""The faults a job spec injects into one rank (`faults` of the spec), for tests and drills.

Each fires on the job's first attempt only, but `slow`: a slow device stays slow.

    crash        kill -9 of the rank's process before the step, once the checkpoint being
                 written in the background (if any) is complete or failed: a drill of a
                 crash between saves
    crash_in_save  kill -9 of the rank's process in the middle of the checkpoint taken after
                 the step's `step` steps are done: its part written, the checkpoint not yet
                 complete (synchronous: before a replica's put, or a sharded checkpoint's
                 marker; in the background: while the write is in flight, a replica's file
                 written and not renamed into place or put, a rank's shards written and not
                 yet reported, so the checkpoint has neither DCP's metadata nor its marker)
    oom          out of memory in a micro-step of the step
    short_batch  the rank drops the last sample of its step (a planted bug)
    slow         the device runs at `factor` x its speed from the step on, while its profile
                 (what the probe saw) is unchanged: its Pacer slows down (a simulated
                 device's, or on a real device one made at speed 1)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from autobatch.probe.simulated import Pacer
from autobatch.step.accumulate import LossFn
from launcher.job.context import RankContext


class Faults:
    """The injected faults of the job spec that concern this rank."""

    def __init__(self, ctx: RankContext) -> None:
        mine = [f for f in ctx.spec.faults if f.rank == ctx.rank]
        self.slows = [f for f in mine if f.kind == "slow"]
        self.pending = [f for f in mine if f.kind != "slow"] if ctx.attempt == 0 else []
        self.pacer: Pacer | None = None  # the rank's, for `slow`

    def before_step(self, step: int, *, settle: Callable[[], None] = lambda: None) -> None:
        """`settle`: waits for the checkpoint in flight (called before a crash)."""
        for f in self.pending:
            if f.kind == "crash" and f.step == step:
                settle()
                os.kill(os.getpid(), 9)  # a real kill -9 of this worker process
        if self.pacer is not None and self.slows:
            self.pacer.slow_down(math.prod(f.factor for f in self.slows if f.step <= step))

    def in_save(self, step: int) -> None:
        """Called in the middle of the checkpoint of `step` (see crash_in_save)."""
        for f in self.pending:
            if f.kind == "crash_in_save" and f.step == step:
                os.kill(os.getpid(), 9)

    def trim(self, step: int, indices: list) -> list:
        """`short_batch`: this rank drops the last sample of its step (a planted bug)."""
        for f in [f for f in self.pending if f.kind == "short_batch" and f.step == step]:
            self.pending.remove(f)
            last = list(indices[-1])[:-1]
            indices = [*indices[:-1], last] if last else indices[:-1]
        return indices

    def wrap(
        self, loss_fn: LossFn, step_of: Callable[[], int], n_micro: Callable[[], int]
    ) -> LossFn:
        """The loss function, raising the `oom` faults in their micro-step."""
        calls = {"step": -1, "i": 0}

        def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            step = step_of()
            if calls["step"] != step:
                calls.update(step=step, i=0)
            calls["i"] += 1
            for f in list(self.pending):
                if f.kind == "oom" and f.step == step:
                    i = 1 if f.micro_step == "first" else n_micro()
                    if calls["i"] == i:
                        self.pending.remove(f)
                        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
            return loss_fn(model, batch)

        return loss
