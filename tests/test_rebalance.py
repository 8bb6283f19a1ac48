"""Closed-loop balance as a pure function: the plan made again from what the ranks measured
(autobatch.planning.rebalance). Table-driven: each row plants real speeds that differ
(or not) from the probe's, feeds the window of measured compute, and says whether the
plan switches and which way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from test_sharded_plan import dev as sharded_dev

from autobatch.errors import PlanError
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.plan import Plan
from autobatch.planning.planner import make_plan
from autobatch.planning.rebalance import NOTE, propose, refit, speed_ratios

B = 128
# The demo's three devices as the probe saw them: A100-like, L4-like, T4-like.
PROBED = (
    DeviceCapacity("a", "sim-a100", 48, 0.004, 0.001, 0.002),
    DeviceCapacity("b", "sim-l4", 20, 0.008, 0.002, 0.002),
    DeviceCapacity("c", "sim-t4", 12, 0.016, 0.004, 0.002),
)


def compute(d: DeviceCapacity, micro_batches: Sequence[int]) -> float:
    """A rank's compute for its micro-batches on a device (no per-step overhead)."""
    return sum(d.micro_step_time(b) for b in micro_batches)


def window(
    plan: Plan, speeds: Sequence[Sequence[float]]
) -> tuple[list[list[float]], list[list[float]]]:
    """(measured, predicted) per rank over a window: in step i rank r runs at speeds[i][r]
    times the speed its plan's time line says (0.5: it takes twice as long)."""
    measured: list[list[float]] = [[] for _ in plan.ranks]
    predicted: list[list[float]] = [[] for _ in plan.ranks]
    for step in speeds:
        for r, speed in zip(plan.ranks, step):
            want = compute(plan.capacity(r.rank), r.micro_batches)
            predicted[r.rank].append(want)
            measured[r.rank].append(want / speed)
    return measured, predicted


def shares(plan: Plan) -> list[int]:
    return [r.samples for r in plan.ranks]


PLAN = make_plan(B, PROBED, keep_all=True)
STEADY = [[1.0, 1.0, 1.0]] * 5

CASES = [
    # (real speeds over a window of five steps, switches?, rank whose share must shrink)
    # nothing changed: the probe was right
    pytest.param(STEADY, False, None, id="as-probed"),
    # every device slowed alike (the machine is busy): the same split is still the best
    pytest.param([[0.5, 0.5, 0.5]] * 5, False, None, id="all-alike"),
    # measurement noise of +-5%: under the threshold
    pytest.param([[1.05, 0.95, 1.0], [0.95, 1.05, 1.0]] * 2 + [[1, 1, 1]], False, None, id="noise"),
    # the slowest device runs at half the speed it probed: it gets less
    pytest.param([[1.0, 1.0, 0.5]] * 5, True, 2, id="slowest-half-speed"),
    # the fastest slowed 3x: it gets less
    pytest.param([[1 / 3, 1.0, 1.0]] * 5, True, 0, id="fastest-a-third"),
    # one step of the window slowed 10x on one rank (a page fault, a collection): the median
    # and the per-step gains ignore it
    pytest.param([[1.0, 1.0, 1.0]] * 4 + [[0.1, 1.0, 1.0]], False, None, id="one-spike"),
    # a load that held for three steps of five, then went: not sustained over the window
    pytest.param([[1.0, 1.0, 0.4]] * 3 + [[1.0, 1.0, 1.0]] * 2, False, None, id="came-and-went"),
    # the T4 at half speed, with one step of the window disturbed on another rank (its
    # core taken by another process): one step in four may disagree, the change is real
    pytest.param([[1.0, 1.0, 0.5]] * 4 + [[1.0, 0.2, 0.5]], True, 2, id="real-with-one-outlier"),
    # two steps of five disturbed: not sustained
    pytest.param(
        [[1.0, 1.0, 0.5]] * 3 + [[1.0, 0.2, 0.5]] * 2, False, None, id="real-two-outliers"
    ),
]


@pytest.mark.parametrize(("speeds", "switches", "shrinks"), CASES)
def test_the_plan_switches_only_when_real_speeds_differ_for_the_window(speeds, switches, shrinks):
    got = propose(PLAN, *window(PLAN, speeds))
    assert got.switch is switches, (got.gain, got.step_gains)
    new = got.plan
    assert sum(shares(new)) == B  # the same global batch
    assert [r.device_id for r in new.ranks] == [r.device_id for r in PLAN.ranks]
    for r in new.ranks:  # the probe's memory limits hold
        assert max(r.micro_batches) <= PROBED[r.rank].max_micro_batch
    if switches:
        assert shares(new)[shrinks] < shares(PLAN)[shrinks]
        assert got.after_s < got.before_s * (1 - got.threshold)
        assert new.notes[-1].startswith(NOTE)


def test_the_refitted_plan_then_holds_no_oscillation():
    # The T4 runs at half speed for good: one switch, then the refitted time lines fit it and
    # window after window changes nothing.
    real = [1.0, 1.0, 0.5]
    plan, switches = PLAN, 0
    for _ in range(10):
        # measured against the plan's own (refitted) time lines: real speed x their scale
        scale = [plan.capacity(r).fixed_s / PROBED[r].fixed_s for r in range(3)]
        got = propose(plan, *window(plan, [[s * k for s, k in zip(real, scale)]] * 5))
        if got.switch:
            plan, switches = got.plan, switches + 1
    assert switches == 1
    assert sum(shares(plan)) == B
    assert shares(plan)[2] < shares(PLAN)[2]


def test_refit_scales_each_time_line_and_keeps_the_memory_figures():
    fitted = refit(PLAN, [1.0, 2.0, 0.5])
    for d, probed, ratio in zip(fitted, PROBED, [1.0, 2.0, 0.5]):
        assert d.fixed_s == pytest.approx(probed.fixed_s * ratio)
        assert d.per_sample_s == pytest.approx(probed.per_sample_s * ratio)
        assert d.step_overhead_s == probed.step_overhead_s  # not measured by the ranks
        assert replace(d, fixed_s=probed.fixed_s, per_sample_s=probed.per_sample_s) == probed


def test_a_slow_device_gets_no_micro_batch_above_what_the_probe_showed_fits():
    # The fast device is tiny in memory: however slow the others get, it stays at its limit.
    devices = (replace(PROBED[0], max_micro_batch=4), *PROBED[1:])
    plan = make_plan(B, devices, keep_all=True)
    got = propose(plan, *window(plan, [[1.0, 0.2, 0.2]] * 5))
    assert got.switch
    for r in got.plan.ranks:
        assert max(r.micro_batches) <= devices[r.rank].max_micro_batch


def test_full_sharding_keeps_equal_accumulation_counts():
    devices = [sharded_dev(0, 4000, a=0.001), sharded_dev(1, 4000, a=0.002), sharded_dev(2, 4000)]
    plan = make_plan(96, devices, keep_all=True, sharding="full")
    got = propose(plan, *window(plan, [[1.0, 1.0, 0.25]] * 5))  # the third at a quarter
    assert got.switch and got.plan.sharding == "full"
    assert len({r.accumulation_steps for r in got.plan.ranks}) == 1
    assert sum(shares(got.plan)) == 96
    assert shares(got.plan)[2] < shares(plan)[2]


def test_the_same_numbers_give_the_same_plan_on_every_rank():
    measured, predicted = window(PLAN, [[1.0, 0.7, 0.5]] * 5)
    a, b = propose(PLAN, measured, predicted), propose(PLAN, measured, predicted)
    assert a == b and a.plan.to_json() == b.plan.to_json()


def test_speed_ratios_are_medians_of_measured_over_predicted():
    got = speed_ratios([[2.0, 2.0, 9.0], [1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert got == (2.0, 0.5)


@pytest.mark.parametrize(
    ("measured", "predicted", "threshold", "match"),
    [
        # a rank whose time was not measured (NaN after a failed measurement)
        ([[1.0], [float("nan")], [1.0]], [[1.0], [1.0], [1.0]], 0.1, "must be finite and > 0"),
        # windows of different lengths
        ([[1.0, 1.0], [1.0], [1.0]], [[1.0, 1.0], [1.0], [1.0]], 0.1, "the same number"),
        # an empty window
        ([[], [], []], [[], [], []], 0.1, "at least one"),
        # a threshold that is not a relative gain
        ([[1.0], [1.0], [1.0]], [[1.0], [1.0], [1.0]], 1.5, "threshold=1.5 must be between"),
        # fewer ranks measured than the plan has
        ([[1.0], [1.0]], [[1.0], [1.0]], 0.1, "2 ratios for a plan of 3 ranks"),
    ],
)
def test_bad_windows_are_refused_with_the_reason(measured, predicted, threshold, match):
    with pytest.raises(PlanError, match=match):
        propose(PLAN, measured, predicted, threshold=threshold)
