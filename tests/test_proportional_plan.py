"""The joint plan of proportional sharding (slice and micro-batch per device) against a
brute-force oracle on small cases, and its values' invariants."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from autobatch.errors import PlanError
from autobatch.planning.proportional import (
    ProportionalDevice,
    plan_proportional,
    state_room,
)


def oracle(B: int, devices: list[ProportionalDevice], P: int, e: int) -> float | None:
    """Every k and every split of B into whole samples per rank: the fastest feasible."""
    best = None
    W = len(devices)
    for k in range(1, B // W + 1):
        for samples in itertools.product(range(k, B + 1), repeat=W):
            if sum(samples) != B:
                continue
            rooms = [state_room(d, math.ceil(n / k), P, e) for d, n in zip(devices, samples)]
            if min(rooms) < 0 or sum(rooms) < P:
                continue
            t = max(
                d.step_overhead_s + k * d.fixed_s + d.per_sample_s * n
                for d, n in zip(devices, samples)
            )
            best = t if best is None else min(best, t)
    return best


def random_case(seed: int) -> tuple[int, list[ProportionalDevice], int]:
    rng = random.Random(seed)
    W = rng.choice([2, 3])
    B = rng.randint(W, 10)
    P = rng.randint(1, 60)
    devices = [
        ProportionalDevice(
            memory_bytes=rng.randint(2 * P * 4, 2 * P * 4 + 900),
            fixed_bytes=rng.randint(0, 40),
            per_sample_bytes=rng.choice([8, 20, 50, 100]),
            fixed_s=rng.choice([0.0, 0.5, 1.0]),
            per_sample_s=rng.choice([0.1, 0.25, 1.0]),
            step_overhead_s=rng.choice([0.0, 0.3]),
        )
        for _ in range(W)
    ]
    return B, devices, P


@pytest.mark.parametrize("seed", range(120))
def test_plan_is_as_fast_as_the_brute_force_oracle(seed):
    B, devices, P = random_case(seed)
    want = oracle(B, devices, P, 4)
    if want is None:
        with pytest.raises(PlanError, match="no plan fits"):
            plan_proportional(B, devices, P)
        return
    plan = plan_proportional(B, devices, P)
    assert plan.step_s == pytest.approx(want, rel=1e-12)
    # the plan's invariants: the global batch, equal micro-step counts, the slices cover
    # the model, every rank within its memory
    assert sum(plan.samples) == B
    assert all(len(mb) == plan.micro_steps and min(mb) >= 1 for mb in plan.micro_batches)
    assert [sum(mb) for mb in plan.micro_batches] == list(plan.samples)
    assert sum(plan.slices) == P and min(plan.slices) >= 0
    for d, peak in zip(devices, plan.peak_bytes):
        assert peak <= d.memory_bytes


def test_a_device_with_room_for_activations_only_holds_no_state():
    P = 100
    big = ProportionalDevice(2 * P * 4 + 8000, 0, 10, 0.0, 1.0)
    tight = ProportionalDevice(2 * P * 4 + 10, 0, 10, 0.0, 1.0)  # one sample, no state
    plan = plan_proportional(4, [big, tight], P)
    assert plan.slices == (P, 0)
    assert set(plan.micro_batches[1]) == {1}  # the tight device: one sample per micro-step


def test_shares_follow_the_room_left_beside_the_micro_batch():
    P = 1000
    devices = [
        ProportionalDevice(8000 + 48_000 - 4, 0, 1, 0.0, 1.0),
        ProportionalDevice(8000 + 16_000 - 4, 0, 1, 0.0, 1.0),
    ]
    plan = plan_proportional(2, devices, P)  # one sample each: rooms 47_999 // 16 etc.
    assert plan.slices[0] > 2 * plan.slices[1]


def test_state_that_fits_nowhere_is_refused_with_the_sizes():
    with pytest.raises(PlanError, match=r"no plan fits: 1000 elements of state"):
        plan_proportional(2, [ProportionalDevice(9000, 0, 1, 0.0, 1.0)] * 2, 1000)
