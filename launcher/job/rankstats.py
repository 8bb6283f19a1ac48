"""One rank's counters and its last step's figures, as metrics snapshots.

Everything here is what the rank measured (samples it processed, its step's
duration, compute and peak memory); the plan's figures ride along for comparison
(its predicted peak, its predicted compute for the micro-batches the rank ran).
A rank's compute is its micro-steps' forward and backward without the wait at the
all-reduce (launcher.job.rebalancing.ComputeClock; a micro-step's wall time where
the clock saw no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from autobatch.metrics.snapshot import REPORTED, RankSnapshot
from autobatch.planning.packing import padding_waste
from autobatch.planning.plan import Plan
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import StepResult
from launcher.job.context import RankContext


class RankStats:
    """Counters and the last step's figures of one rank, as metrics snapshots."""

    def __init__(
        self, ctx: RankContext, plan: Plan, max_len: int | None, start_step: int = 0
    ) -> None:
        self.ctx, self.plan, self.max_len = ctx, plan, max_len
        self.start_step = start_step  # the job's step this rank began at
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.oom_events = 0
        self.replans = dict(ctx.replans)
        self.last: dict[str, Any] = {}
        self.durations: list[float] = []
        self.checkpoint_stall_s: float | None = None  # the last save's, on this rank
        self.checkpoint_write_s: float | None = None  # the last completed write's

    def on_checkpoint(self, stall_s: float) -> None:
        """A save began: the training loop waited `stall_s` for it (the previous write
        finishing, the copy to host memory; the whole write when synchronous)."""
        self.checkpoint_stall_s = stall_s

    def on_checkpoint_written(self, write_s: float | None) -> None:
        """A save's write completed, `write_s` after its copy to host memory."""
        if write_s is not None:
            self.checkpoint_write_s = write_s

    def on_oom(self, here: bool, plan: Plan) -> None:
        self.oom_events += int(here)
        self.replans["oom"] = self.replans.get("oom", 0) + 1
        self.plan = plan

    def on_step(
        self,
        result: StepResult,
        seconds: float,
        plan: Plan,
        micro_batches: list,
        lengths_of: dict[int, int] | None,
        memory: TensorMemory | None,
        device: torch.device,
        compute: Sequence[float | None] = (),
    ) -> None:
        """A step (or a refused one: the figures, but no step counted) seen by this rank;
        `compute`: its micro-steps' compute as the clock measured it (None: not seen)."""
        self.plan = plan
        sizes = [len(mb) for mb in micro_batches]
        if not result.refused:
            self.steps += 1
            self.samples += sum(sizes)
            self.tokens += result.global_items if self.ctx.rank == 0 else 0
            self.durations.append(seconds)
        peak = allocated = reserved = None
        if memory is not None:
            peak = memory.peak_bytes
        elif device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            allocated = torch.cuda.memory_allocated(device)
            reserved = torch.cuda.memory_reserved(device)
            torch.cuda.reset_peak_memory_stats(device)
        work = _work(micro_batches, lengths_of, self.max_len)
        wall = result.micro_step_s
        measured = [w if c is None else c for c, w in zip(compute, wall)] or list(wall)
        synced = compute[-1] if compute and len(compute) == len(wall) else None
        self.last = {
            "loss": result.loss,
            "seconds": seconds,
            "peak": peak,
            "allocated": allocated,
            "reserved": reserved,
            "sync_wait": _sync_wait(result, plan, self.ctx.rank, work)
            if synced is None
            else max(0.0, wall[-1] - synced),
            "compute": sum(measured) if wall else None,
            "predicted_compute": _predicted(plan, self.ctx.rank, work) if wall else None,
            "sizes": sizes,
            "global_samples": result.global_samples,
            "padding": None if lengths_of is None else padding_waste(micro_batches, lengths_of),
        }

    def snapshot(self, rebalances: Sequence[dict[str, Any]] = ()) -> RankSnapshot:
        """The snapshot to push; `rebalances`: the job's so far (rank 0 reports the latest)."""
        me = self.plan.ranks[self.ctx.rank]
        durations, self.durations = tuple(self.durations), []
        return RankSnapshot(
            job=self.ctx.job,
            rank=self.ctx.rank,
            node=self.ctx.node,
            device=self.ctx.device.name,
            device_uuid=self.ctx.device.uuid,
            simulated=self.ctx.device.simulated,
            device_memory_total_bytes=self.ctx.device.total_bytes,
            torch_memory_allocated_bytes=self.last["allocated"],
            torch_memory_reserved_bytes=self.last["reserved"],
            torch_memory_peak_bytes=self.last["peak"],
            plan_predicted_peak_bytes=me.predicted_peak_bytes,
            micro_batch_size=max(self.last["sizes"]),
            accumulation_steps=len(self.last["sizes"]),
            rank_samples_per_step=sum(self.last["sizes"]),
            global_batch_size=self.plan.global_batch_size,
            effective_global_batch_size=self.last["global_samples"],  # measured, all ranks
            plan_efficiency_ratio=self.plan.efficiency,
            step_duration_s=self.last["seconds"],
            sync_wait_s=self.last["sync_wait"],
            rank_compute_s=self.last["compute"],
            plan_predicted_compute_s=self.last["predicted_compute"],
            train_loss=self.last["loss"],
            padding_waste_ratio=self.last["padding"],
            checkpoint_stall_s=self.checkpoint_stall_s,
            checkpoint_write_s=self.checkpoint_write_s,
            step_durations_s=durations,
            samples_processed_total=self.samples,
            tokens_processed_total=self.tokens,
            optimizer_steps_total=self.steps,
            oom_events_total=self.oom_events,
            worker_restarts_total=self.ctx.restarts,
            replans_total=self.replans,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,  # measured
            resizes_total=dict(self.ctx.resizes),
            rebalances_total=len(rebalances),
            rebalances=tuple(rebalances[-REPORTED:]) if self.ctx.rank == 0 else (),
            step=self.start_step + self.steps,
        )


def _work(
    micro_batches: list, lengths_of: dict[int, int] | None, max_len: int | None
) -> list[float]:
    """Each micro-batch's work in samples of the plan's worst case: its sample count, or
    for packed sequences its padded tokens / the longest sequence the job allows."""
    if lengths_of is None or max_len is None:
        return [float(len(mb)) for mb in micro_batches]
    return [len(mb) * max(lengths_of[i] for i in mb) / max_len for mb in micro_batches]


def _predicted(plan: Plan, rank: int, work: list[float]) -> float:
    """The compute the plan's time line predicts for micro-batches of this much work."""
    model = plan.capacity(rank).micro_step_time
    return sum(model(w) for w in work)


def _sync_wait(result: StepResult, plan: Plan, rank: int, work: list[float]) -> float | None:
    """Time the synced micro-step took beyond this rank's own compute for it: the wait for
    the slowest rank at the all-reduce. Its compute is the plan's time model for it, scaled
    by how this step's no_sync micro-steps compared with the same model."""
    times = result.micro_step_s
    if not times:
        return None
    model = plan.capacity(rank).micro_step_time
    expected = model(work[-1])
    if len(times) > 1:
        expected *= sum(times[:-1]) / sum(model(w) for w in work[:-1])
    return max(0.0, times[-1] - expected)
