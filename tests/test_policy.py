"""The failure policy: each kind of failure, and mixes of them, to one decision."""

from __future__ import annotations

import pytest
import torch

from autobatch.errors import LaunchError, PlanError
from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan
from launcher.job.policy import (
    RankFailure,
    classify,
    decide,
    lower_micro_batches,
    retry_in_place,
)

# Three devices of different memory; every one gets a share of the 24 samples.
PLAN = make_plan(
    24,
    [
        DeviceCapacity("b0", "big", 8, 0.01, 0.001, 0.0),
        DeviceCapacity("b1", "mid", 4, 0.01, 0.002, 0.0),
        DeviceCapacity("b2", "small", 2, 0.01, 0.004, 0.0),
    ],
    keep_all=True,
)


def f(rank: int, kind: str) -> RankFailure:
    return RankFailure(rank, kind, f"rank {rank}: {kind}")


@pytest.mark.parametrize(
    "failures, restarts, lost, action, cause, replan",
    [
        # a dead worker: everyone restarts from the checkpoint on the same plan
        ([f(1, "lost")], 0, set(), "restart", "lost", None),
        # its peers' broken collectives come along; still one lost worker
        ([f(0, "lost"), f(2, "lost")], 1, set(), "restart", "lost", None),
        # a bug in the task fails the job, even when peers only lost their collective
        ([f(2, "lost"), f(0, "task_error")], 0, set(), "fail", "task_error", None),
        # out of memory in the synced backward: restart with that device lowered
        ([f(1, "oom_synced"), f(0, "lost")], 0, set(), "restart", "oom_synced", "oom"),
        # out of memory in a no_sync micro-step, agreed: retry in place, lowered
        ([f(0, "oom_no_sync")], 0, set(), "retry_in_place", "oom_no_sync", "oom"),
        # ... which is not a restart, so no restarts left does not matter
        ([f(0, "oom_no_sync")], 3, set(), "retry_in_place", "oom_no_sync", "oom"),
        # a node gone: re-plan on the devices left
        ([f(2, "lost")], 0, {"b2"}, "replan", "lost", "device_lost"),
        # no restarts left
        ([f(1, "lost")], 3, set(), "fail", "lost", None),
        ([f(1, "oom_synced")], 3, set(), "fail", "oom_synced", None),
        # every device gone
        ([f(0, "lost")], 0, {"b0", "b1", "b2"}, "fail", "lost", None),
    ],
)
def test_failures_to_decision(failures, restarts, lost, action, cause, replan):
    d = decide(failures, restarts=restarts, max_restarts=3, plan=PLAN, lost_devices=lost)
    assert (d.action, d.cause, d.replan) == (action, cause, replan)
    assert all(str(x) in d.reason for x in failures)  # every rank's message is in the reason
    assert d.plan.global_batch_size == 24
    if replan == "device_lost":
        assert {r.device_id for r in d.plan.ranks} == {"b0", "b1"}
    if replan == "oom":
        rank = min(x.rank for x in failures if x.kind.startswith("oom"))
        assert d.plan.ranks[rank].max_micro_batch < PLAN.ranks[rank].max_micro_batch
    if action in ("restart", "fail") and replan is None:
        assert d.plan == PLAN


def test_out_of_memory_at_micro_batch_one_fails_saying_so():
    one = make_plan(4, [DeviceCapacity("b0", "tiny", 1, 0.01, 0.001, 0.0)])
    d = decide([f(0, "oom_no_sync")], restarts=0, max_restarts=3, plan=one)
    assert d.action == "fail"
    assert "ran out of memory at micro-batch 1" in d.reason


def test_lowering_keeps_the_global_batch_and_cuts_to_three_quarters():
    lowered = lower_micro_batches(PLAN, [0])
    assert sum(r.samples for r in lowered.ranks) == 24
    assert lowered.capacity(0).max_micro_batch == PLAN.ranks[0].micro_batch_size * 3 // 4
    with pytest.raises(LaunchError, match="micro-batch 1"):
        lower_micro_batches(make_plan(2, [DeviceCapacity("b0", "t", 1, 0.01, 0.001, 0.0)]), [0])


def test_retry_in_place_lowers_the_ranks_that_ran_out_as_decide_does():
    failures = [f(0, "oom_no_sync"), f(2, "oom_no_sync")]
    decided = decide(failures, restarts=0, max_restarts=0, plan=PLAN)
    assert retry_in_place(PLAN, [2, 0], step=7) == decided.plan
    assert sum(r.samples for r in decided.plan.ranks) == 24


def test_retry_in_place_at_micro_batch_one_raises_the_reason():
    one = make_plan(4, [DeviceCapacity("b0", "tiny", 1, 0.01, 0.001, 0.0)])
    with pytest.raises(LaunchError, match=r"micro-batch 1: .*: rank 0: out of memory at step 7$"):
        retry_in_place(one, [0], step=7)


@pytest.mark.parametrize(
    "exc, kind",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "oom_synced"),
        (PlanError("no plan"), "task_error"),  # the project's own errors: bad input
        (ValueError("bad value"), "task_error"),
        (KeyError("x"), "task_error"),
        (ImportError("no module"), "task_error"),
        (RuntimeError("[gloo] Connection closed by peer"), "lost"),  # a peer died
        (None, "lost"),  # nothing to go by
    ],
)
def test_classify_by_exception_type(exc, kind):
    assert classify(exc) == kind


def test_decide_needs_a_failure():
    with pytest.raises(ValueError, match="at least one failure"):
        decide([], restarts=0, max_restarts=3, plan=PLAN)


def test_a_lost_device_never_shrinks_an_elastic_job_below_min_count():
    lost = [f(2, "lost")]
    kept = decide(lost, restarts=0, max_restarts=3, plan=PLAN, lost_devices={"b2"}, min_count=2)
    assert kept.action == "replan" and len(kept.plan.ranks) == 2
    under = decide(
        lost, restarts=0, max_restarts=3, plan=PLAN, lost_devices={"b1", "b2"}, min_count=2
    )
    assert under.action == "fail"
    assert under.reason.startswith("1 device(s) left, below devices.min_count=2")
