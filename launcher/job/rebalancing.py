"""Closed-loop balance inside the ranks: what each rank's compute measured, and the switch
to a rebalanced plan between two steps (docs/rebalancing.md).

`ComputeClock` times this rank's compute in each micro-step: from the call of the loss
function (the forward's start) to the last gradient accumulated into a parameter (a
post-accumulate-grad hook on every trainable parameter). Under DDP the gradient
all-reduce runs in the background and is waited for at the end of the backward, after
that last gradient: the wait for the slowest rank is not in it. On a GPU both ends are
CUDA events (the device's time, not the launch's). Where no hook fires (FSDP2 sets the
sharded gradients itself) a micro-step's compute is its wall time, collectives included.

`Rebalancer` keeps the window's (measured, predicted) compute of each step. Every
`rebalance_window` steps the ranks all-gather them (one small collective, no new
process group), every rank computes the same proposal
(`autobatch.planning.rebalance.propose`) and, when it switches, every rank trains the
new plan from the next step. The first step after a plan change is not measured (new
shapes warm up). Rebalances are recorded (`history`), checkpointed and reported in the
snapshots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autobatch.errors import PlanError
from autobatch.planning.plan import Plan
from autobatch.planning.rebalance import DEFAULT_THRESHOLD, DEFAULT_WINDOW, propose
from autobatch.step.accumulate import LossFn
from launcher.job.spec import JobSpec


class ComputeClock:
    """This rank's compute per micro-step, the wait at the all-reduce left out."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._spans: list[list[Any]] = []  # per micro-step: [start, last gradient or None]
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._gradient)
            for p in model.parameters()
            if p.requires_grad
        ]

    def wrap(self, loss_fn: LossFn) -> LossFn:
        def timed(model: nn.Module, batch: Any) -> torch.Tensor:
            self._spans.append([self._now(), None])
            return loss_fn(model, batch)

        return timed

    def start_step(self) -> None:
        self._spans.clear()

    def _gradient(self, _param: torch.Tensor) -> None:
        if self._spans:
            self._spans[-1][1] = self._now(self._spans[-1][1])

    def _now(self, event: Any = None) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = event or torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def step_compute(self, micro_steps: int) -> tuple[float | None, ...]:
        """Each micro-step's compute in the step just done (seconds); None where no gradient
        was seen (the caller takes its wall time)."""
        spans = self._spans[-micro_steps:] if micro_steps else []
        if len(spans) != micro_steps:
            return (None,) * micro_steps
        return tuple(None if end is None else self._seconds(start, end) for start, end in spans)

    def _seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


class Rebalancer:
    """One rank's window of measured and predicted compute, and the rebalances so far."""

    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        threshold: float = DEFAULT_THRESHOLD,
        *,
        enabled: bool = True,
        history: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.enabled, self.window, self.threshold = enabled, window, threshold
        self.history: list[dict[str, Any]] = [dict(h) for h in history]
        self._measured: list[float] = []
        self._predicted: list[float] = []
        self._warm_up = 1

    @classmethod
    def of(cls, spec: JobSpec, history: Sequence[dict[str, Any]] = ()) -> Rebalancer:
        """The spec's settings; the equal split (a baseline for comparisons) stays as it is."""
        enabled = spec.rebalance == "auto" and spec.planner == "optimal"
        window, threshold = spec.rebalance_window, spec.rebalance_threshold
        return cls(window, threshold, enabled=enabled, history=history)

    def restart_window(self) -> None:
        """The plan changed: the window starts again, after one step of warm-up."""
        self._measured.clear()
        self._predicted.clear()
        self._warm_up = 1

    def observe(self, measured_s: float | None, predicted_s: float | None) -> None:
        """A step done: its compute as measured and as the plan predicted (None: unknown)."""
        if self._warm_up:
            self._warm_up -= 1
            return
        self._measured.append(math.nan if measured_s is None else measured_s)
        self._predicted.append(math.nan if predicted_s is None else predicted_s)
        del self._measured[: -self.window], self._predicted[: -self.window]  # one rank: never due

    def due(self) -> bool:
        """Every rank gives the same answer (the same steps were observed on every rank)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.enabled and world > 1 and len(self._measured) >= self.window

    def decide(self, plan: Plan, step: int, device: torch.device) -> Plan | None:
        """The window shared and judged alike on every rank: the plan to train from `step`
        on, or None to keep `plan`."""
        n = self.window
        mine = torch.tensor(
            [*self._measured[:n], *self._predicted[:n]], dtype=torch.float64, device=device
        )
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        windows = [row.tolist() for row in rows]
        self._measured.clear()
        self._predicted.clear()
        try:
            got = propose(
                plan, [w[:n] for w in windows], [w[n:] for w in windows], threshold=self.threshold
            )
        except PlanError:  # a time not measured (the same on every rank): keep the plan
            return None
        if not got.switch:
            return None
        self.history.append(
            {
                "step": step,
                "before_s": got.before_s,
                "after_s": got.after_s,
                "ratios": list(got.ratios),
                "micro_batches": [list(r.micro_batches) for r in got.plan.ranks],
            }
        )
        self.restart_window()
        return got.plan
