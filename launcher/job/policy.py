"""The failure policy: what a job does when ranks fail. Pure: values in, a decision out.

    decide(failures seen on the ranks, restarts so far, plan, devices lost) -> Decision
    retry_in_place(plan, ranks out of memory in a no_sync micro-step, step) -> Plan

    a rank's task raised a bad-input error or a bug    -> fail (a restart would repeat it)
    a storage fault (no space, no permission, the      -> fail, naming the path and what is
      file system unreachable or read-only)               missing (a restart would repeat it)
    out of memory in a no_sync micro-step (agreed)     -> retry in place, that device lowered
    out of memory in the synced backward               -> restart from the checkpoint, lowered
    a device whose node is gone                        -> re-plan on the devices left
                                                          (at least min_count of them)
    anything else (a dead worker, a broken collective) -> restart from the checkpoint
    no restarts left, or nothing left to plan on       -> fail, saying why

An attempt's failures are judged by their root cause: the first failure is often a
consequence (a peer's collective broke because another rank died), so a task error
outranks a storage fault, which outranks an out-of-memory, which outranks a lost worker
(`ROOT_ORDER`; benchmarks/gpu_check.py orders a failed run's errors the same way).
Retries in place do not count as restarts: they cost one global batch, not a checkpoint
interval.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from autobatch.errors import AutobatchError, LaunchError, StorageError
from autobatch.planning.plan import DeviceCapacity, Plan
from autobatch.planning.planner import make_plan
from autobatch.step.atomic import storage_errno
from launcher.job.bounds import check_plan_size

FailureKind = Literal["task_error", "storage", "oom_no_sync", "oom_synced", "lost"]
Action = Literal["retry_in_place", "restart", "replan", "fail"]

# Errors a restart would only repeat: bad input or a bug in the task.
TASK_ERRORS: tuple[type[BaseException], ...] = (
    AutobatchError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    ImportError,
    NotImplementedError,
)
# The root cause of an attempt's failures: a task error, a storage fault, an out-of-memory,
# then a lost worker (what a failure elsewhere causes).
ROOT_ORDER: dict[FailureKind, int] = {
    "task_error": 0,
    "storage": 1,
    "oom_synced": 2,
    "oom_no_sync": 2,
    "lost": 3,
}


@dataclass(frozen=True)
class RankFailure:
    rank: int  # -1: not one rank's (a start-up phase)
    kind: FailureKind
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Decision:
    action: Action
    plan: Plan  # the plan of the next attempt (unchanged for restart and fail)
    reason: str  # for the user: what happened and what happens next
    cause: FailureKind  # the root cause among the failures
    replan: Literal["oom", "device_lost"] | None = None  # why the plan changed, for metrics


def classify(cause: BaseException | None) -> FailureKind:
    """The kind of a rank's exception (the task's own, not Ray's wrapper). gloo reports a
    dead peer as a plain RuntimeError: that is a lost worker, not an error in the task. A
    storage fault is the StorageError a checkpoint's write raises (or an OSError with a
    storage errno that escaped without being mapped)."""
    import torch

    if isinstance(cause, torch.OutOfMemoryError):
        return "oom_synced"
    if isinstance(cause, StorageError) or storage_errno(cause):
        return "storage"
    if isinstance(cause, TASK_ERRORS):
        return "task_error"
    return "lost"


def root_cause(failures: Sequence[RankFailure]) -> RankFailure:
    return min(failures, key=lambda f: (ROOT_ORDER[f.kind], f.rank))


def decide(
    failures: Sequence[RankFailure],
    *,
    restarts: int,
    max_restarts: int,
    plan: Plan,
    lost_devices: Collection[str] = (),
    keep_all: bool = False,
    min_count: int | None = None,
) -> Decision:
    """What to do after `failures` (at least one), `restarts` restarts into the job."""
    if not failures:
        raise ValueError("decide() needs at least one failure")
    root = root_cause(failures)
    what = "; ".join(str(f) for f in sorted(failures, key=lambda f: (ROOT_ORDER[f.kind], f.rank)))
    if root.kind == "task_error":
        return Decision("fail", plan, f"the task failed: {what}", root.kind)
    if root.kind == "storage":
        return Decision("fail", plan, f"storage fault (not retried): {what}", root.kind)
    oom_ranks = sorted({f.rank for f in failures if f.kind == root.kind and f.rank >= 0})
    if root.kind == "oom_no_sync":
        return _lowered("retry_in_place", plan, oom_ranks, what, root.kind)
    if restarts >= max_restarts:
        return Decision("fail", plan, f"failed after {restarts} restart(s): {what}", root.kind)
    if root.kind == "oom_synced":
        return _lowered("restart", plan, oom_ranks[:1], what, root.kind)
    lost = set(lost_devices)
    if lost:
        left = [d for d in plan.inputs if d.device_id not in lost]
        if not left:
            return Decision("fail", plan, f"every device of the job is gone: {what}", root.kind)
        if min_count is not None and len(left) < min_count:
            why = f"{len(left)} device(s) left, below devices.min_count={min_count}: {what}"
            return Decision("fail", plan, why, root.kind)
        try:
            new = replan(plan, left, keep_all=keep_all)
        except AutobatchError as exc:
            why = f"cannot re-plan on the devices left ({exc}): {what}"
            return Decision("fail", plan, why, root.kind)
        gone = ", ".join(sorted(lost))
        return Decision(
            "replan", new, f"{what}; re-planned without {gone}", root.kind, "device_lost"
        )
    return Decision("restart", plan, what, root.kind)


def retry_in_place(plan: Plan, oom_ranks: Sequence[int], step: int) -> Plan:
    """The plan to retry the same global batch on, after `oom_ranks` ran out of memory in a
    no_sync micro-step (every rank agreed to drop the step): their micro-batches lowered.
    A LaunchError saying why when a rank cannot go lower (decide() fails the job so)."""
    what = "; ".join(f"rank {r}: out of memory at step {step}" for r in sorted(oom_ranks))
    try:
        return lower_micro_batches(plan, sorted(oom_ranks))
    except LaunchError as exc:
        raise LaunchError(f"{exc}: {what}") from exc


def _lowered(
    action: Action, plan: Plan, ranks: list[int], what: str, cause: FailureKind
) -> Decision:
    try:
        lowered = lower_micro_batches(plan, ranks)
    except LaunchError as exc:
        return Decision("fail", plan, f"{exc}: {what}", cause)
    sizes = ", ".join(f"rank {r} to {lowered.ranks[r].micro_batch_size}" for r in ranks)
    return Decision(action, lowered, f"{what}; micro-batch lowered: {sizes}", cause, "oom")


def lower_micro_batches(plan: Plan, ranks: Sequence[int]) -> Plan:
    """The plan after `ranks` ran out of memory: their limit drops to 3/4 of the micro-batch
    that failed (at least one less), the same global batch is re-split over the same ranks."""
    by_id = {r.device_id: r for r in plan.ranks}
    inputs = []
    for d in plan.inputs:
        if d.device_id not in by_id:
            continue
        r = by_id[d.device_id]
        if r.rank in ranks:
            if r.micro_batch_size <= 1:
                raise LaunchError(
                    f"rank {r.rank} ({d.name}) ran out of memory at micro-batch 1: it cannot "
                    "train this model; remove the device or lower the sequence length"
                )
            cap = min(r.micro_batch_size - 1, r.micro_batch_size * 3 // 4) or 1
            # A sharded plan re-derives limits from the memory model: lower its cap too.
            memory = d.memory and replace(
                d.memory,
                cap=min(d.memory.cap, cap),
                max_micro_batch=min(d.memory.max_micro_batch, cap),
            )
            d = replace(d, max_micro_batch=cap, memory=memory)
        inputs.append(d)
    return replan(plan, inputs, keep_all=True)


def replan(plan: Plan, devices: Sequence[DeviceCapacity], *, keep_all: bool) -> Plan:
    """A new plan on `devices` for the same global batch, sharded as `plan` was; a LaunchError
    when it breaks the bound on a plan's size (launcher.job.bounds)."""
    new = make_plan(plan.global_batch_size, devices, keep_all=keep_all, sharding=plan.sharding)
    check_plan_size(new)
    return new
