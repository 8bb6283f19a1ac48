"""The joint plan of proportional sharding (slice and micro-batch per device) against a
brute-force oracle on small cases, its values' invariants, and its memory model against
the step's (`autobatch.step.proportional_layout.state_bytes`) on one model."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from autobatch.errors import PlanError
from autobatch.planning.memory import ModelState, sharding_term
from autobatch.planning.proportional import (
    ADAM_STEP_BYTES,
    ProportionalDevice,
    Units,
    peak_bytes,
    plan_proportional,
    state_room,
)
from autobatch.planning.proportional import units_of as units_of_state
from autobatch.probe.model_state import model_state
from autobatch.step.proportional_layout import Layout, Slices, state_bytes
from autobatch.step.proportional_module import units_of as units_of_module
from autobatch.tasks.tiny_gpt import TinyGPT, TinyGPTConfig


def oracle(B: int, devices: list[ProportionalDevice], P: int, e: int) -> float | None:
    """Every k and every split of B into whole samples per rank: the fastest feasible."""
    best = None
    W = len(devices)
    for k in range(1, B // W + 1):
        for samples in itertools.product(range(k, B + 1), repeat=W):
            if sum(samples) != B:
                continue
            bs = [math.ceil(n / k) for n in samples]
            if any(d.cap is not None and b > d.cap for d, b in zip(devices, bs)):
                continue  # beyond what its figures hold for
            rooms = [state_room(d, b, P, e) for d, b in zip(devices, bs)]
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
            cap=rng.choice([None, None, 1, 2, 3]),
            step_fixed_bytes=rng.choice([0, 30]),
            step_temp_bytes=rng.choice([0.0, 0.0, 4.0, 9.5]),  # foreach AdamW: 4 (one copy)
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
    for d, peak, mb in zip(devices, plan.peak_bytes, plan.micro_batches):
        assert peak <= d.memory_bytes
        assert d.cap is None or max(mb) <= d.cap


@pytest.mark.parametrize("seed", range(40))
def test_the_room_is_the_largest_slice_whose_peak_fits(seed):
    """state_room against peak_bytes, by brute force over the slice: the micro-step's and
    the optimizer step's peaks both within the memory, and one more element not."""
    B, devices, P = random_case(seed)
    units = Units(max(1, P // 3), 4)
    for d in devices:
        for b in range(1, 4):
            room = state_room(d, b, P, 4, units)
            top = d.memory_bytes // 16 + 2  # a slice element takes 16 bytes or more
            fits = [s for s in range(top) if peak_bytes(d, b, s, P, 4, units) <= d.memory_bytes]
            assert room == (max(fits) if fits else -1), (d, b)


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


def test_per_block_units_hold_what_one_flat_unit_cannot():
    """Gathering the root and one block instead of the whole model frees 2 (P - g) e bytes
    on every device: a model that does not fit as one flat unit fits in units."""
    P, gathered = 10_000, 1_000
    devices = [ProportionalDevice(3 * P * 4, 0, 10, 0.0, 1.0)] * 2  # each: 3 P e bytes
    with pytest.raises(PlanError, match="no plan fits"):
        plan_proportional(4, devices, P)  # 2 P e gathered on each: P e left, 4 P e needed
    plan = plan_proportional(4, devices, P, units=Units(gathered, 11))
    assert sum(plan.slices) == P
    for d, s, peak in zip(devices, plan.slices, plan.peak_bytes):
        assert peak == 2 * gathered * 4 + 10 * 2 + 16 * s + (4 * 11 if s else 0)
        assert peak <= d.memory_bytes


# ---------------------------------------------------------------------------
# the planner's memory model against the step's (one model, counted by both)

GPT = TinyGPTConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=5)


def gpt_state_and_layout(sizes: tuple[int, ...]) -> tuple[ModelState, Layout]:
    torch.manual_seed(0)
    model = TinyGPT(GPT)
    _, unit_params = units_of_module(model)
    params = [p for ps in unit_params for p in ps]
    units = tuple(u for u, ps in enumerate(unit_params) for _ in ps)
    total = sum(p.numel() for p in params)
    layout = Layout(tuple(p.numel() for p in params), units, Slices.from_shares(total, sizes))
    return model_state(model, optimizer_bytes=2 * 4 * total), layout


@pytest.mark.parametrize("shares", [(0.7, 0.25, 0.05), (0.0, 0.7, 0.3), (1, 1, 1)])
def test_the_plans_state_bytes_are_the_steps_on_every_rank(shares):
    """What the planner holds per rank (gathered units, slice, gradient, AdamW) equals the
    step's `state_bytes` for the same slices, but for AdamW's 4-byte steps, which the
    planner counts per unit of the model (the step: per unit a rank's slice meets)."""
    state, layout = gpt_state_and_layout(shares)
    units = units_of_state(state)
    assert units.gathered_elems == layout.gathered_elems()
    assert units.count == layout.n_units == GPT.n_layers + 1
    zero = ProportionalDevice(10**9, 0, 0, 0.0, 1.0)  # no activations: the state alone
    for rank, s in enumerate(layout.slices.sizes):
        step = state_bytes(layout, rank, 4)
        planned = peak_bytes(zero, 0, s, layout.total, 4, units)
        steps = ADAM_STEP_BYTES * len(layout.pieces(rank))
        assert planned - (ADAM_STEP_BYTES * units.count if s else 0) == sum(step.values()) - steps


def test_the_even_memory_term_is_the_steps_state_at_even_slices():
    """`memory`'s "proportional" term (even shares, for `auto` and the what-if) is the
    step's largest rank at even slices, to AdamW's steps and the ceil of the division."""
    state, layout = gpt_state_and_layout((1, 1, 1))
    held = state.total_bytes + sharding_term(state, "proportional", 3).micro_bytes
    step = max(sum(state_bytes(layout, r, 4).values()) for r in range(3))
    assert abs(held - step) <= ADAM_STEP_BYTES * layout.n_units + 4 * 3
