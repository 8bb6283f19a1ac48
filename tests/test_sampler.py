"""The sampler: the same global batches whatever the plan, exact at epoch ends, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from autobatch.errors import SamplerError
from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler


def _plan(B: int, limits: list[int], speeds: list[float]):
    devices = [
        DeviceCapacity(f"d{i}", f"G{i}", m, 0.002, 0.001 / s)
        for i, (m, s) in enumerate(zip(limits, speeds))
    ]
    return make_plan(B, devices)


PLANS = [
    _plan(24, [64], [1.0]),  # one device
    _plan(24, [4, 16, 2], [1.0, 3.0, 0.5]),  # three mixed devices
    _plan(24, [3, 3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 5, 6, 7]),  # seven
]


@pytest.mark.parametrize("plan", PLANS, ids=["1dev", "3mixed", "7mixed"])
def test_ranks_micro_batches_concatenate_to_the_same_global_batch(plan):
    sampler = GlobalBatchSampler(100, 24, seed=7)
    reference = GlobalBatchSampler(100, 24, seed=7)
    for step in range(10):  # crosses epoch ends (4 full batches per epoch)
        pieces = [mb for r in range(plan.world_size) for mb in sampler.micro_batches(plan, r, step)]
        for r, rank in enumerate(plan.ranks):
            sizes = [len(mb) for mb in sampler.micro_batches(plan, r, step)]
            assert sizes == list(rank.micro_batches)
        np.testing.assert_array_equal(np.concatenate(pieces), reference.global_batch(step))


def test_drop_mode_never_yields_a_short_batch_and_skips_only_the_remainder():
    s = GlobalBatchSampler(10, 3, seed=1, epoch_end="drop")
    assert s.steps_per_epoch == 3
    epoch0 = [s.global_batch(j) for j in range(3)]
    assert all(len(b) == 3 for b in epoch0)
    seen = np.concatenate(epoch0)
    assert len(set(seen.tolist())) == 9  # disjoint: 9 of 10 samples, one dropped
    assert s.global_batch(3).tolist() != epoch0[0].tolist()  # epoch 1: a new permutation
    assert set(s.global_batch(3).tolist()) <= set(range(10))


def test_carry_mode_runs_into_the_next_epoch_and_skips_nothing():
    s = GlobalBatchSampler(10, 3, seed=1, epoch_end="carry")
    stream = np.concatenate([s.global_batch(j) for j in range(10)])  # 30 = 3 epochs
    assert all(len(s.global_batch(j)) == 3 for j in range(10))
    for e in range(3):
        assert sorted(stream[e * 10 : (e + 1) * 10].tolist()) == list(range(10))
    np.testing.assert_array_equal(stream[:10], s.permutation(0))
    assert s.global_batch(3).tolist() == [*s.permutation(0)[9:], *s.permutation(1)[:2]]


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = (GlobalBatchSampler(50, 5, seed=s) for s in (3, 3, 4))
    assert a.global_batch(2).tolist() == b.global_batch(2).tolist()
    assert a.global_batch(2).tolist() != c.global_batch(2).tolist()


def test_state_round_trip_resumes_at_the_exact_next_batch_under_another_plan():
    s = GlobalBatchSampler(100, 24, seed=5, epoch_end="carry")
    for _ in range(6):
        s.advance()
    restored = GlobalBatchSampler.from_state(s.state().to_dict())
    assert restored.step == 6 and restored.epoch == 1
    np.testing.assert_array_equal(restored.global_batch(), s.global_batch())
    new_plan = PLANS[1]  # a re-plan on other devices: same data
    got = np.concatenate([restored.rank_share(new_plan, r) for r in range(new_plan.world_size)])
    np.testing.assert_array_equal(got, s.global_batch(6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"dataset_size": 5, "global_batch_size": 8},
            r"dataset of 5 samples is smaller than "
            r"global_batch_size=8.*epoch_end='carry'",
        ),
        ({"dataset_size": 0, "global_batch_size": 8}, r"dataset_size=0 must be >= 1"),
        ({"dataset_size": 10, "global_batch_size": 0}, r"global_batch_size=0 must be >= 1"),
        (
            {"dataset_size": 10, "global_batch_size": 2, "epoch_end": "pad"},
            r"epoch_end='pad' must be 'drop' or 'carry'",
        ),
        ({"dataset_size": 10, "global_batch_size": 2, "step": -1}, r"step=-1 must be >= 0"),
    ],
)
def test_bad_sampler_arguments_are_rejected(kwargs, match):
    with pytest.raises(SamplerError, match=match):
        GlobalBatchSampler(**kwargs)


def test_plan_for_another_global_batch_is_rejected():
    s = GlobalBatchSampler(100, 20)
    with pytest.raises(SamplerError, match="plan is for global batch 24, sampler for 20"):
        s.micro_batches(PLANS[0], 0)


def test_resume_with_a_different_data_order_is_rejected():
    s = GlobalBatchSampler(100, 24, seed=1)
    other = GlobalBatchSampler(100, 24, seed=2).state()
    with pytest.raises(SamplerError, match="checkpoint has seed=2 but the job has 1"):
        s.check_resume(other)
