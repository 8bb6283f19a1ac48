"""One optimizer step over a rank's micro-batches, equal to the full-batch step.

Every micro-step but the last runs forward *and* backward inside
``ddp.no_sync()``; the last runs synced, so there is exactly one gradient
all-reduce per optimizer step however many micro-steps a rank runs (ranks may
run different numbers). Each micro-batch's loss is the SUM over its items
(samples or target tokens) times ``world_size / N_global``, where N_global is
the item count of the whole global batch on all ranks: DDP's average over
ranks then yields the full-batch mean gradient. Dividing per-micro-batch means
by the number of micro-steps would instead over-weight small micro-batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autobatch.errors import PlanError
from autobatch.step.collective import collective_device
from autobatch.step.precision import Precision, autocast, check_precision
from autobatch.step.wrap import REPLICATED, ModelWrapping

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""(model, micro_batch) -> the SUM of the per-item losses of that micro-batch."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss per item of the global batch (this rank's part if not synced)
    local_items: int | None  # items this rank processed, when `count_items` was given
    global_items: int
    micro_steps: int
    grad_norm: float | None  # total norm before clipping, when clipping is on
    micro_step_s: tuple[float, ...] = ()  # wall time of each forward+backward
    skipped: bool = False  # fp16 overflow: no optimizer update, on every rank alike
    oom: bool = False  # some rank ran out of memory in a no_sync micro-step: step not taken
    oom_here: bool = False  # ... and it was this rank
    global_samples: int | None = None  # samples all ranks processed, when they were counted
    refused: bool = False  # the ranks' samples were not the expected global batch: no update


class Accumulator:
    """Runs optimizer steps made of micro-batches on one rank (DDP or a plain module).

    >>> acc = Accumulator(ddp_model, optimizer, max_grad_norm=1.0)
    >>> result = acc.step(micro_batches, loss_fn, global_items=global_batch_size)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
        precision: Precision = "fp32",
        scaler: torch.amp.GradScaler | None = None,
        agree_on_oom: bool = False,
        wrapping: ModelWrapping = REPLICATED,
        loss_scaling: bool = True,
    ) -> None:
        """`model` is the wrapped model (`wrapping.wrap(...)`: DDP, or the plain module on
        one rank). `loss_scaling=False` runs fp16 without a GradScaler (a traced step on
        fake tensors cannot take the scaler's inf check)."""
        check_precision(precision)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0 or None")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.precision = precision
        self.device_type = next(model.parameters()).device.type
        if precision == "fp16" and scaler is None and loss_scaling:
            scaler = torch.amp.GradScaler(self.device_type)
        if scaler is not None and not getattr(wrapping, "scales_fp16", True):
            raise PlanError(
                f"precision='fp16' with loss scaling is not supported by {wrapping!r}: the "
                "scaler's inf check would see only this rank's part of the gradients; use "
                "bf16 or fp32"
            )
        self.scaler = scaler
        self.agree_on_oom = agree_on_oom
        self.wrapping = wrapping
        self.world_size = wrapping.world_size(model)

    # -- the optimizer step ------------------------------------------------
    def step(
        self,
        micro_batches: Sequence[Any],
        loss_fn: LossFn,
        *,
        global_items: int | None = None,
        count_items: Callable[[Any], int] | None = None,
        sync_loss: bool = True,
        oom_stand_in: Callable[[], Any] | None = None,
        local_samples: int | None = None,
        expected_samples: int | None = None,
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches.

        Give `global_items` (the item count of the whole global batch, e.g. the
        global batch size for a per-sample loss) when it is known; otherwise give
        `count_items(micro_batch)` and the count is summed over ranks by one small
        all-reduce before the first backward.

        With ``agree_on_oom``, give `oom_stand_in`: a function returning a one-sample
        micro-batch. A rank that runs out of memory in a no_sync micro-step then runs
        it (weighted 0) as its synced micro-step, and the ranks agree on dropping the
        step in the same small all-reduce that sums the loss, right after the gradient
        all-reduce. Without it they agree before the synced micro-step: a second point
        per step where every rank waits for the slowest.

        `local_samples` (the samples this rank processes) is summed over ranks in that
        same all-reduce: `StepResult.global_samples` is the global batch as measured. With
        `expected_samples` a step whose measured batch differs is refused on every rank
        alike: no optimizer update, `refused=True`.
        """
        if not micro_batches:
            raise ValueError("a rank needs at least one micro-batch per optimizer step")
        local_items = None
        if count_items is not None:
            local_items = sum(int(count_items(mb)) for mb in micro_batches)
        if global_items is None:
            if local_items is None:
                raise ValueError("give global_items, or count_items to count them over ranks")
            global_items = int(self._all_reduce_sum(local_items, torch.int64))
        if global_items < 1:
            raise ValueError(f"global_items={global_items} must be >= 1")
        weight = self.world_size / global_items

        loss_sum = torch.zeros((), dtype=torch.float64)
        oom_here = False
        times: list[float] = []
        for mb in micro_batches[:-1]:
            try:
                loss_sum += self._timed(mb, loss_fn, weight, times, last=False)
            except torch.OutOfMemoryError:
                if not self.agree_on_oom:
                    raise
                oom_here = True  # recover outside the except block: its frame pins tensors
            if oom_here:
                break
        if self.agree_on_oom and oom_stand_in is None and self._any_rank(oom_here):
            return self._oom_result(local_items, global_items, oom_here)
        if oom_here:
            # Keep the collectives matched: the synced backward of a one-sample stand-in,
            # weighted 0. The step is dropped on every rank after the all-reduce below.
            self.optimizer.zero_grad(set_to_none=True)
            self.micro_step(oom_stand_in(), loss_fn, weight=0.0)
        else:
            loss_sum += self._timed(micro_batches[-1], loss_fn, weight, times, last=True)
        # Right after the gradient all-reduce every rank is at the same point, so this small
        # all-reduce (the loss, and whether any rank ran out of memory) waits for nobody;
        # after the optimizer step it would wait for the slowest optimizer.
        sums = [float(loss_sum), float(oom_here), float(local_samples or 0)]
        if sync_loss or local_samples is not None or (self.agree_on_oom and oom_stand_in):
            sums = self._all_reduce_sums(sums)
        loss_total, oom_count, samples = sums
        if oom_count:
            return self._oom_result(local_items, global_items, oom_here)
        global_samples = None if local_samples is None else round(samples)
        if expected_samples is not None and global_samples != expected_samples:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(
                float("nan"),
                local_items,
                global_items,
                0,
                None,
                global_samples=global_samples,
                refused=True,
            )
        grad_norm, skipped = self.update()
        return StepResult(
            loss=loss_total / global_items,
            local_items=local_items,
            global_items=global_items,
            micro_steps=len(micro_batches),
            grad_norm=grad_norm,
            micro_step_s=tuple(times),
            skipped=skipped,
            global_samples=global_samples,
        )

    def _oom_result(self, local_items: int | None, global_items: int, here: bool) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            loss=float("nan"),
            local_items=local_items,
            global_items=global_items,
            micro_steps=0,
            grad_norm=None,
            oom=True,
            oom_here=here,
        )

    def micro_step(
        self,
        batch: Any,
        loss_fn: LossFn,
        *,
        weight: float,
        last: bool = True,
        after_forward: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch, its loss SUM times `weight`, in the
        wrapping's context (gradients synchronised only when `last`). Returns the loss sum,
        detached. `after_forward` runs between the two (the probe times the forward)."""
        with self.wrapping.micro_step(self.model, last=last):
            with autocast(self.device_type, self.precision):
                loss = loss_fn(self.model, batch)
            if after_forward is not None:
                after_forward()
            if loss.dtype in (torch.float16, torch.bfloat16):
                loss = loss.float()
            scaled = loss * weight
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        return loss.detach()

    def _timed(
        self, mb: Any, loss_fn: LossFn, weight: float, times: list[float], *, last: bool
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        loss = self.micro_step(mb, loss_fn, weight=weight, last=last)
        loss = loss.to(torch.float64).cpu()  # waits for the device: the time is the work's
        times.append(time.perf_counter() - t0)
        return loss

    def update(self) -> tuple[float | None, bool]:
        """The optimizer step after the micro-steps: unscale (fp16), clip, step, zero the
        gradients. Returns (the total norm before clipping, whether fp16 skipped the step)."""
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = getattr(self.wrapping, "clip_grad_norm", None)  # a wrapping's global norm
        if self.max_grad_norm is not None and clip is not None:
            grad_norm = clip(self.model, self.max_grad_norm)
        elif self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        skipped = False
        if self.scaler is not None:
            # Gradients are identical on every rank after the all-reduce, so every
            # rank finds the same inf/nan and skips (or not) alike.
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    # -- helpers -------------------------------------------------------------
    def _all_reduce_sum(self, value: float, dtype: torch.dtype) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=dtype, device=self._collective_device())
        dist.all_reduce(t)
        return t.item()

    def _all_reduce_sums(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _collective_device(self) -> torch.device:
        return collective_device(next(self.model.parameters()).device)
