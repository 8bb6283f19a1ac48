"""Length-aware micro-batching: exact global batch, token budgets, time-balanced split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autobatch.errors import PlanError
from autobatch.planning.packing import TokenBudget, pack_global_batch, padding_waste, token_budgets
from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan


def predicted_time(micro_batches, lengths_of, b: TokenBudget) -> float:
    return b.step_overhead_s + sum(
        b.fixed_s + b.per_token_s * len(mb) * max(lengths_of[i] for i in mb) for mb in micro_batches
    )


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=3, max_size=80),
    spec=st.lists(
        st.tuples(st.integers(1, 8), st.floats(0, 0.01), st.floats(1e-5, 1e-3)),
        min_size=1,
        max_size=3,
    ),
)
def test_every_sequence_once_every_rank_some_and_budgets_respected(lengths, spec):
    spec = spec[: len(lengths)]
    budgets = [TokenBudget(m * 64, a, c) for m, a, c in spec]
    indices = [1000 + i for i in range(len(lengths))]
    lengths_of = dict(zip(indices, lengths))
    packed = pack_global_batch(indices, lengths, budgets)
    assert len(packed) == len(budgets)
    flat = [i for rank in packed for mb in rank for i in mb]
    assert sorted(flat) == indices
    for rank, b in zip(packed, budgets):
        assert rank and all(mb for mb in rank)
        for mb in rank:
            assert len(mb) * max(lengths_of[i] for i in mb) <= b.max_tokens
    assert pack_global_batch(indices, lengths, budgets) == packed  # a pure function


def test_short_sequences_make_large_micro_batches_and_long_ones_small():
    budget = TokenBudget(max_tokens=4 * 64, fixed_s=1e-5, per_token_s=1e-5)
    lengths = [64, 64, 64, 64, 64, 64] + [8] * 64
    packed = pack_global_batch(list(range(len(lengths))), lengths, [budget])
    assert [len(mb) for mb in packed[0]] == [4, 2, 32, 32]
    assert padding_waste(packed[0], dict(enumerate(lengths))) == 0.0


def test_a_short_sequence_joins_a_wider_micro_batch_when_a_micro_step_costs_more():
    # A micro-step's fixed cost (1 ms) is worth 100 padded tokens here: the two 8-token
    # sequences ride along in the second 64-wide micro-batch.
    budget = TokenBudget(max_tokens=4 * 64, fixed_s=1e-3, per_token_s=1e-5)
    lengths = [64] * 6 + [8, 8]
    packed = pack_global_batch(list(range(8)), lengths, [budget])
    assert [len(mb) for mb in packed[0]] == [4, 4]


def test_the_split_is_balanced_by_time_not_by_count():
    # Rank 0 is three times faster per token: it takes about three quarters of the tokens,
    # and the two predicted times differ by less than one micro-step of the slow rank.
    fast = TokenBudget(max_tokens=16 * 64, fixed_s=0.002, per_token_s=1e-5)
    slow = TokenBudget(max_tokens=4 * 64, fixed_s=0.002, per_token_s=3e-5)
    lengths = [(7 * i) % 61 + 3 for i in range(128)]
    lengths_of = dict(enumerate(lengths))
    packed = pack_global_batch(list(range(128)), lengths, [fast, slow])
    tokens = [sum(lengths_of[i] for mb in rank for i in mb) for rank in packed]
    assert 0.70 <= tokens[0] / sum(tokens) <= 0.80
    times = [predicted_time(r, lengths_of, b) for r, b in zip(packed, [fast, slow])]
    assert abs(times[0] - times[1]) <= slow.fixed_s + slow.per_token_s * slow.max_tokens


def test_a_rank_too_slow_to_help_still_gets_one_sequence():
    fast = TokenBudget(max_tokens=64 * 32, fixed_s=0.001, per_token_s=1e-6)
    crawl = TokenBudget(max_tokens=32, fixed_s=10.0, per_token_s=1.0, step_overhead_s=5.0)
    lengths = [32, 30, 5, 9, 12, 2]
    packed = pack_global_batch(list(range(6)), lengths, [fast, crawl])
    assert packed[1] == [[5]]  # the shortest sequence


def test_token_budgets_come_from_the_plan_at_the_maximum_length():
    devices = [
        DeviceCapacity("a", "A100", 16, 0.01, 0.002, 0.005),
        DeviceCapacity("b", "T4", 4, 0.01, 0.008),
    ]
    budgets = token_budgets(make_plan(32, devices), max_len=128)
    assert budgets[0] == TokenBudget(16 * 128, 0.01, 0.002 / 128, 0.005)
    assert budgets[1].max_tokens == 4 * 128


@pytest.mark.parametrize(
    "indices, lengths, budgets, match",
    [
        ([1, 2], [5], [TokenBudget(64, 0, 1e-3)], "2 indices but 1 lengths"),
        ([1], [5], [TokenBudget(64, 0, 1e-3)] * 2, "cannot give each of the 2 ranks one"),
        ([1, 2], [5, 80], [TokenBudget(64, 0, 1e-3)], "budget of 64 tokens is below the longest"),
    ],
)
def test_bad_inputs_are_named(indices, lengths, budgets, match):
    with pytest.raises(PlanError, match=match):
        pack_global_batch(indices, lengths, budgets)


def test_padding_waste_is_padded_over_all_tokens():
    assert padding_waste([[0, 1]], {0: 10, 1: 6}) == pytest.approx(4 / 20)
