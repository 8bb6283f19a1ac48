"""Sharding as a memory lever: a rank's memory by mode and world size, plans made for the
world size they include, and full sharding's equal micro-step counts."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autobatch.errors import PlanError
from autobatch.planning.capacity import MIN_MICRO_STEP_S
from autobatch.planning.equal_steps import equal_accumulation_shares, min_max_shares
from autobatch.planning.memory import (
    MemoryModel,
    ModelState,
    PeakLine,
    largest_under,
)
from autobatch.planning.plan import DeviceCapacity, Plan
from autobatch.planning.planner import make_plan
from autobatch.planning.sharded import choose_sharding

# A replica: P = 40, G = 40, O = 80 (S = 160) bytes; root unit 4, largest unit 4.
STATE = ModelState(
    params_bytes=40, grads_bytes=40, optimizer_bytes=80, largest_unit_bytes=4, root_unit_bytes=4
)
OPT_TEMP = 40  # the optimizer step's temporaries: its line is S + 40, flat


def memory(budget: int, act: int, *, cap: int = 64, reserve: int = 0) -> MemoryModel:
    """A replica's peak: micro-steps S + 2 + act * b, optimizer step S + 40."""
    micro = (PeakLine(STATE.total_bytes + 2, act),)
    opt = PeakLine(STATE.total_bytes + OPT_TEMP, 0)
    m = largest_under((*micro, opt), budget, cap)
    return MemoryModel(budget, micro, opt, STATE, m, cap, reserve)


def dev(
    i: int, budget: int, act: int = 4, a: float = 0.01, c: float = 0.001, o: float = 0.0, **kw
) -> DeviceCapacity:
    """A device's replica capacity with its memory model (as ModelProfile.capacity makes)."""
    mem = memory(budget, act, **kw)
    fit = mem.fit()
    return DeviceCapacity(
        f"d{i}",
        f"GPU{i}",
        fit.max_micro_batch,
        a,
        c,
        o,
        memory_bytes=budget,
        peak_fixed_bytes=fit.peak_fixed_bytes,
        peak_per_sample_bytes=fit.peak_per_sample_bytes,
        memory=mem,
    )


# ---------------------------------------------------------------------------
# the memory model


@pytest.mark.parametrize(
    "mode, W, state_bytes",
    [
        ("none", 4, 160),  # a replica: P + G + O
        ("optimizer", 4, 40 + 40 + 30),  # P and G unsharded during the step, + (P + O) / W
        ("optimizer", 1, 160),  # one rank: Sharded leaves the model unwrapped, a replica
        ("full", 4, 40 + 4 + 4 * 4),  # S / W + R + 4 U
        ("full", 3, 54 + 4 + 16),  # S / W rounded up
        ("full", 1, 160),
    ],
)
def test_state_per_rank_by_mode_and_world_size(mode, W, state_bytes):
    assert STATE.per_rank(mode, W) == state_bytes


def test_sharding_moves_the_micro_steps_by_the_state_and_divides_the_optimizer_step():
    mem = memory(1000, act=4)
    for mode, W in [("none", 1), ("optimizer", 4), ("full", 4), ("full", 8)]:
        shift = STATE.per_rank(mode, W) - STATE.total_bytes
        for b in (1, 5, 20):
            micro = 162 + 4 * b + shift
            opt = math.ceil((160 + OPT_TEMP) / (1 if mode == "none" else W))
            assert mem.peak_bytes(b, mode, W) == max(micro, opt), (mode, W, b)


def test_none_keeps_the_replicas_measured_limit_and_ignores_the_world_size():
    mem = replace(memory(300, act=4), max_micro_batch=7)  # measured 7 (the lines say more)
    fit = mem.fit("none", 8)
    assert fit.max_micro_batch == 7
    assert fit.peak_fixed_bytes + 7 * fit.peak_per_sample_bytes >= mem.peak_bytes(7)


def test_sharded_limit_is_the_largest_predicted_fit_within_the_cap():
    mem = memory(200, act=4, cap=64)  # replica: the optimizer step (200) just fits
    assert mem.fit().max_micro_batch == 9  # 162 + 4 * 9 = 198
    assert mem.fit("optimizer", 4).max_micro_batch == 22  # 112 + 4b <= 200
    assert mem.fit("full", 4).max_micro_batch == 34  # 62 + 4b <= 200
    assert memory(200, act=4, cap=30).fit("full", 4).max_micro_batch == 30  # not past the cap


def test_sharded_budget_gets_the_ddp_gradient_buckets_back():
    mem = memory(200, act=4, reserve=40)  # DDP's buckets were reserved out of the budget
    assert mem.budget("none") == 200 and mem.budget("full") == 240
    assert mem.fit("full", 4).max_micro_batch == 44  # 62 + 4b <= 240


def test_sharding_can_cost_memory_and_the_model_says_so():
    # SGD without momentum: no optimizer state to shard; the unsharded parameters stay,
    # so "optimizer" adds the rank's own shard on top.
    sgd = ModelState(params_bytes=40, grads_bytes=40, optimizer_bytes=0)
    assert sgd.per_rank("optimizer", 4) == 80 + 10


def test_capacity_rederives_its_figures_for_a_mode_and_world_size():
    d = dev(0, 200)
    full4 = d.sharded("full", 4)
    assert (full4.sharding, full4.world_size, full4.max_micro_batch) == ("full", 4, 34)
    assert full4.state_bytes() == 60 and d.state_bytes() == 160
    assert full4.predicted_peak_bytes(34) >= d.memory.peak_bytes(34, "full", 4)
    assert full4.sharded("none") == d  # from any derived capacity back to the replica
    assert (full4.fixed_s, full4.per_sample_s) == (d.fixed_s, d.per_sample_s)


@pytest.mark.parametrize(
    "call, match",
    [
        # no memory model: sharding needs the profile's state bytes
        (lambda: DeviceCapacity("x", "T4", 4, 0.01, 0.001).sharded("full", 2), "no memory model"),
        (lambda: dev(0, 200).sharded("zero3", 2), r"sharding='zero3' must be one of"),
        (lambda: dev(0, 200).sharded("full"), r"needs the world size"),
        (lambda: dev(0, 200).sharded("full", 0), r"world_size=0 must be an integer >= 1"),
        (lambda: DeviceCapacity("x", "T4", 4, 0.01, 0.001, sharding="full"), "needs its world"),
        (lambda: ModelState(-1, 0, 0), r"params_bytes=-1 must be an integer >= 0"),
        (lambda: make_plan(8, [dev(0, 200)], sharding="ddp"), r"sharding='ddp' must be one of"),
    ],
)
def test_bad_sharding_inputs_are_refused_with_what_is_allowed(call, match):
    with pytest.raises(PlanError, match=match):
        call()


# ---------------------------------------------------------------------------
# full sharding: the same number of micro-steps on every rank


def brute_force_equal_k(B: int, devices: list[DeviceCapacity]) -> float:
    """The optimum over every k and every split with k <= s_r <= k * m_r (inf: none)."""
    best = math.inf
    for k in range(1, B // len(devices) + 1):
        ranges = [range(k, k * d.max_micro_batch + 1) for d in devices]
        for head in itertools.product(*ranges[:-1]):
            last = B - sum(head)
            if k <= last <= k * devices[-1].max_micro_batch:
                shares = (*head, last)
                best = min(best, max(_time(d, k, s) for d, s in zip(devices, shares)))
    return best


def _time(d: DeviceCapacity, k: int, samples: int) -> float:
    """A step of k micro-steps and `samples` samples."""
    return d.step_overhead_s + k * d.fixed_s + d.per_sample_s * samples


fleets = st.lists(
    st.tuples(
        st.integers(1, 8),
        st.floats(0.0, 0.2),
        st.one_of(st.just(0.0), st.floats(1e-4, 0.05)),  # no per-sample cost: takes all it may
        st.floats(0.0, 0.1),
    ).filter(lambda d: d[1] + d[2] >= MIN_MICRO_STEP_S),  # a micro-step takes some time
    min_size=1,
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(B=st.integers(1, 30), spec=fleets)
def test_equal_accumulation_is_the_exhaustive_optimum(B, spec):
    devices = [DeviceCapacity(f"d{i}", "G", m, a, c, o) for i, (m, a, c, o) in enumerate(spec)]
    want = brute_force_equal_k(B, devices)
    found = equal_accumulation_shares(B, devices)
    if want == math.inf:
        assert found is None
        return
    k, shares = found
    assert shares.sum() == B
    assert all(k <= s <= k * d.max_micro_batch for d, s in zip(devices, shares))
    assert max(_time(d, k, s) for d, s in zip(devices, shares)) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "base, c, lower, upper, total, want",
    [
        ([0, 0], [1, 1], [1, 1], [10, 10], 10, [5, 5]),  # equal speed: equal shares
        ([0, 0], [1, 3], [1, 1], [10, 10], 8, [6, 2]),  # 3x slower: a third as many
        ([0, 0], [1, 1], [1, 1], [3, 10], 10, [3, 7]),  # a memory limit binds
        ([5, 0], [0, 1], [2, 2], [9, 9], 10, [8, 2]),  # no per-sample cost: it takes all it may
        ([9, 0], [1, 1], [2, 2], [9, 9], 6, [2, 4]),  # forced minimum on a slow device
    ],
)
def test_min_max_shares_examples(base, c, lower, upper, total, want):
    base, c = np.array(base, dtype=float), np.array(c, dtype=float)
    got = min_max_shares(base, c, np.array(lower), np.array(upper), total)
    assert sum(got) == total and np.all(got >= lower) and np.all(got <= upper)
    assert max(base + c * got) == max(base + c * np.array(want))


# ---------------------------------------------------------------------------
# plans made for the world size they include


def brute_force_sharded(B: int, devices: list[DeviceCapacity], mode: str) -> float:
    """The optimum over every group of devices (their capacities at the group's size),
    every k ("full") and every split with at least one sample per rank."""
    best = math.inf
    for size in range(1, len(devices) + 1):
        for group in itertools.combinations(devices, size):
            caps = [d.sharded(mode, size) for d in group]
            if min(d.max_micro_batch for d in caps) < 1:
                continue
            if mode == "full":
                best = min(best, brute_force_equal_k(B, caps))
                continue
            for shares in itertools.product(range(1, B + 1), repeat=size):
                if sum(shares) == B:
                    best = min(best, max(d.rank_time(s) for d, s in zip(caps, shares)))
    return best


device_specs = st.tuples(
    st.integers(60, 260),  # budget: from fitting nothing to fitting a replica
    st.integers(2, 20),  # activation bytes per sample
    st.floats(0.0, 0.2),
    st.floats(1e-4, 0.05),
    st.floats(0.0, 0.1),
)
memory_fleets = st.lists(device_specs, min_size=1, max_size=3)


def _fleet(spec: list[tuple]) -> list[DeviceCapacity]:
    return [dev(i, bud, act, a, c, o, cap=12) for i, (bud, act, a, c, o) in enumerate(spec)]


@pytest.mark.parametrize("mode", ["optimizer", "full"])
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 16), spec=memory_fleets)
def test_sharded_plan_is_the_exhaustive_optimum_over_groups(mode, B, spec):
    devices = _fleet(spec)
    want = brute_force_sharded(B, devices, mode)
    if want == math.inf:
        with pytest.raises(PlanError):
            make_plan(B, devices, sharding=mode)
        return
    plan = make_plan(B, devices, sharding=mode)
    assert plan.predicted_step_time_s == pytest.approx(want, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(3, 16), spec=memory_fleets.filter(lambda s: len(s) == 3))
def test_full_plan_keeping_every_device_is_the_exhaustive_optimum_at_their_world_size(B, spec):
    devices = _fleet(spec)
    caps = [d.sharded("full", 3) for d in devices]
    if min(d.max_micro_batch for d in caps) < 1:
        with pytest.raises(PlanError, match="over 3 ranks"):
            make_plan(B, devices, sharding="full", keep_all=True)
        return
    want = brute_force_equal_k(B, caps)
    if want == math.inf:
        with pytest.raises(PlanError):
            make_plan(B, devices, sharding="full", keep_all=True)
        return
    plan = make_plan(B, devices, sharding="full", keep_all=True)
    assert plan.world_size == 3 and not plan.excluded
    assert plan.predicted_step_time_s == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("mode", ["optimizer", "full"])
@settings(max_examples=100, deadline=None)
@given(
    B=st.integers(1, 3000),
    spec=st.lists(device_specs, min_size=1, max_size=6),
)
def test_sharded_plan_takes_exactly_the_global_batch_at_its_world_size(mode, B, spec):
    devices = [dev(i, bud, act, a, c, o, cap=512) for i, (bud, act, a, c, o) in enumerate(spec)]
    try:
        plan = make_plan(B, devices, sharding=mode)
    except PlanError:
        return  # e.g. fewer samples than ranks for "full", or nothing fits
    assert sum(r.samples for r in plan.ranks) == B
    assert len(plan.ranks) + len(plan.excluded) == len(devices)
    assert plan.sharding == mode
    for r in plan.ranks:
        cap = plan.capacity(r.rank)
        assert (cap.sharding, cap.world_size) == (mode, plan.world_size)
        assert max(r.micro_batches) <= cap.max_micro_batch
        assert r.state_bytes == STATE.per_rank(mode, plan.world_size)
    if mode == "full":
        assert len({r.accumulation_steps for r in plan.ranks}) == 1


def test_a_device_that_fits_only_when_the_model_is_shared_widely_is_planned_at_that_size():
    # Replicas fit none; fully sharded over 3 the small one fits (54 + 20 + 2 + 4b <= 100),
    # over 2 it would need 80 + 20 + 2 + 4 = 106 > 100.
    devices = [dev(0, 150), dev(1, 150), dev(2, 100)]
    assert [d.max_micro_batch for d in devices] == [0, 0, 0]
    plan = make_plan(30, devices, sharding="full")
    assert plan.world_size == 3
    assert [plan.capacity(r).max_micro_batch for r in range(3)] == [18, 18, 6]


def test_leaving_a_slow_device_out_replans_the_others_at_their_own_world_size():
    fast = [dev(0, 200, a=0.001, c=0.001), dev(1, 200, a=0.001, c=0.001)]
    slow = dev(2, 200, a=1.0, c=0.001)  # a second per micro-step
    plan = make_plan(40, [*fast, slow], sharding="full")
    assert [r.device_id for r in plan.ranks] == ["d0", "d1"]
    assert all(plan.capacity(r).world_size == 2 for r in range(2))
    (left,) = plan.excluded
    assert left.device_id == "d2" and "with it (3 ranks) the step takes" in left.reason


def test_a_device_that_does_not_fit_is_left_out_with_its_needs_and_the_rest_replanned():
    devices = [dev(0, 200), dev(1, 200), dev(2, 61)]  # d2: not even fully sharded over 3
    plan = make_plan(24, devices, sharding="full")
    assert plan.world_size == 2
    (left,) = plan.excluded
    assert "with sharding full over 2 ranks, GPU2 (d2) needs" in left.reason
    with pytest.raises(PlanError, match=r"over 3 ranks, GPU2 \(d2\) needs .* budget is"):
        make_plan(24, devices, sharding="full", keep_all=True)


def test_full_sharding_with_fewer_samples_than_ranks_names_the_cause():
    with pytest.raises(PlanError, match="smaller than the 3 ranks"):
        make_plan(2, [dev(0, 200), dev(1, 200), dev(2, 200)], sharding="full", keep_all=True)


def test_replica_plan_from_sharded_capacities_rederives_them_first():
    devices = [dev(0, 300).sharded("full", 2), dev(1, 300).sharded("full", 2)]
    plan = make_plan(40, devices)
    assert plan.sharding == "none"
    assert [plan.capacity(r).max_micro_batch for r in range(2)] == [34, 34]


# ---------------------------------------------------------------------------
# the plan carries the mode


def test_sharded_plan_round_trips_through_json_with_its_memory_models():
    plan = make_plan(40, [dev(0, 200), dev(1, 150)], sharding="full")
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.sharding == "full"
    assert again.capacity(0).memory == plan.capacity(0).memory


def test_plan_written_before_sharding_still_loads_as_replicas():
    data = make_plan(10, [DeviceCapacity("a", "A", 4, 0.01, 0.001)]).to_dict()
    for key in ("sharding",):
        del data[key]
    for r in data["ranks"]:
        del r["state_bytes"]
    for d in data["inputs"]:
        for key in ("sharding", "world_size", "memory"):
            del d[key]
    plan = Plan.from_dict(json.loads(json.dumps(data)))
    assert plan.sharding == "none" and plan.ranks[0].state_bytes is None


def test_full_plan_with_unequal_micro_step_counts_is_rejected():
    plan = make_plan(30, [dev(0, 200), dev(1, 200)], sharding="optimizer")
    data = plan.to_dict()
    data["sharding"] = "full"
    for d in data["inputs"]:
        d["sharding"] = "full"
    data["ranks"][0]["micro_batches"] = [10, 10]
    data["ranks"][1]["micro_batches"] = [10]
    with pytest.raises(PlanError, match=r"same number of micro-steps on every rank; got \[2, 1\]"):
        Plan.from_dict(data)


def test_plan_rejects_ranks_planned_for_another_world_size():
    plan = make_plan(30, [dev(0, 200), dev(1, 200)], sharding="full")
    data = plan.to_dict()
    data["inputs"][0]["world_size"] = 3
    with pytest.raises(PlanError, match="planned with sharding='full' over 3 ranks"):
        Plan.from_dict(data)


def test_table_and_summary_show_the_mode_and_the_state_per_rank():
    plan = make_plan(40, [dev(0, 200), dev(1, 150)], sharding="full")
    text = plan.render_table()
    assert "state/rank" in text.splitlines()[0]
    assert "sharding full over 2 rank(s)" in text
    assert "every rank runs" in text
    replica = make_plan(40, [DeviceCapacity("a", "A", 8, 0.01, 0.001)])
    assert "state/rank" not in replica.render_table()  # no memory model: as before


# ---------------------------------------------------------------------------
# auto: the lightest mode that fits every device


@pytest.mark.parametrize(
    "budgets, W, mode, says",
    [
        ([300, 300], None, "none", "a full replica fits every device"),
        # replica needs 200 (optimizer step); optimizer over 4: 112 + 4 = 116 for one sample
        ([300, 190, 300, 300], None, "optimizer", "a replica does not fit: GPU1 (d1) needs 200 B"),
        # optimizer over 4 needs 116; full needs 66
        ([300, 100, 300, 300], None, "full", "every device fits"),
        # the same device over 8 ranks: optimizer needs 160 - 80 + 15 + 2 + 4 = 101 > 100
        ([300, 100], 8, "full", "over 8 ranks"),
    ],
)
def test_choose_sharding_takes_the_lightest_mode_that_fits_every_device(budgets, W, mode, says):
    devices = [dev(i, b) for i, b in enumerate(budgets)]
    got, why = choose_sharding(devices, W)
    assert got == mode and says in why


def test_choose_sharding_names_the_devices_no_mode_fits():
    devices = [dev(0, 300), dev(1, 50), dev(2, 300)]
    with pytest.raises(PlanError, match=r"fully sharded, GPU1 \(d1\) needs 80 B .* budget is 50 B"):
        choose_sharding(devices)


def test_auto_plan_says_why_it_chose_its_mode():
    plan = make_plan(40, [dev(0, 300), dev(1, 190), dev(2, 300), dev(3, 300)], sharding="auto")
    assert plan.sharding == "optimizer"
    assert any(n.startswith("sharding optimizer") and "does not fit" in n for n in plan.notes)


# ---------------------------------------------------------------------------
# the formulas against FSDP2 itself


FSDP_PEAKS = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from autobatch.step.shard import Sharded
from autobatch.tasks.tiny_gpt import TinyGPT, TinyGPTConfig, token_loss_sum

cfg = TinyGPTConfig(**json.loads(sys.argv[1]))

def peak(W, mode, b):
    dist.init_process_group("fake", rank=0, world_size=W, store=FakeStore())
    wrapping = Sharded(mode)  # the step's own wrapping seam
    model = wrapping.wrap(TinyGPT(cfg), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    tracker = FSDPMemTracker(model, opt)
    tracker.track_external(model, opt)
    def step(track):
        for i in range(2):
            with wrapping.micro_step(model, last=i == 1):
                if track:
                    tracker.reset_mod_stats()
                x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))
                token_loss_sum(model, {"input_ids": x, "labels": x}).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step(False)  # builds the optimizer state
    with tracker:
        step(True)
    dist.destroy_process_group()
    return sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())

print(json.dumps([peak(W, mode, b) for W, mode, b in json.loads(sys.argv[2])]))
"""


@pytest.mark.slow
def test_formulas_bound_fsdp2s_own_tracked_peak():
    """The profile's predictions for a sharded step, against FSDPMemTracker on a fake
    process group of W ranks, the model wrapped by the step's `Sharded(mode)`."""
    import torch

    from autobatch.probe.devices import cpu_device
    from autobatch.probe.profile import profile_model
    from autobatch.tasks.tiny_gpt import TinyGPTConfig, tiny_gpt_task

    sizes = {"vocab_size": 512, "seq_len": 32, "d_model": 128, "n_heads": 4, "n_layers": 2}
    task = tiny_gpt_task(cfg=TinyGPTConfig(**sizes), dataset_size=16)
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)  # noqa: E731
    mem = profile_model(task, cpu_device(), make_optimizer=adamw, max_micro_batch=8).memory_model()
    cases = [(2, "full", 1), (4, "full", 4), (4, "optimizer", 4), (2, "optimizer", 8)]
    out = subprocess.run(
        [sys.executable, "-c", FSDP_PEAKS, json.dumps(sizes), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for (W, mode, b), tracked in zip(cases, json.loads(out.stdout.splitlines()[-1])):
        predicted = mem.peak_bytes(b, mode, W)
        assert tracked <= predicted <= 1.3 * tracked, (W, mode, b, predicted, tracked)


@pytest.mark.parametrize(("mode", "W"), [("none", None), ("optimizer", 2), ("full", 2)])
def test_a_device_that_cannot_fit_one_sample_says_what_one_needs_and_its_budget(mode, W):
    from autobatch.planning.plan import size_text

    one_sample = memory(10**6, 8).peak_bytes(1, mode, W or 1)
    devices = [dev(0, 10**6, act=8), dev(1, one_sample - 1, act=8)]  # d1: a byte short
    with pytest.raises(PlanError) as failure:
        make_plan(4, devices, sharding=mode, keep_all=True)
    budget = devices[1].memory.budget(mode)
    assert one_sample > budget  # the message's two numbers never contradict it
    message = str(failure.value)
    need, has = size_text(one_sample), size_text(budget)
    assert f"needs {need} for one sample, its budget is {has}" in message
