"""Probe and plan inside a process group the user started (the torchrun door), then train.

Three real gloo ranks, each declaring a simulated device of another size: every rank
must get the same ragged plan, and one step of it must give the single-process
full-batch gradient (float64, computed here with plain torch: the oracle shares no code).
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_ranks
from torch import nn

from autobatch import Accumulator, GlobalBatchSampler, Replicated, Task, plan_for_group
from autobatch.errors import DeviceSpecError, PlanError
from autobatch.probe.group import SIMULATED_ENV

B = 64  # more than the three devices hold in one micro-step each: someone accumulates
DEVICES = "sim-big:80KiB,sim-mid:64KiB:0.5,sim-small:52KiB:0.25"  # measured, not fixed
g = torch.Generator().manual_seed(1)
X = torch.randn(96, 16, generator=g, dtype=torch.float64)
Y = torch.randn(96, 1, generator=g, dtype=torch.float64)


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).double()


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])


def sum_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum()


TASK = Task(build_model=build, dataset=list(zip(X, Y)), collate=collate, loss_fn=sum_loss)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1.0)


def rank_main(rank: int, world: int, cache: str) -> dict:
    plan = plan_for_group(TASK, B, make_optimizer=sgd, keep_all=True, cache_dir=cache)
    model = build()
    acc = Accumulator(Replicated().wrap(model, torch.device("cpu")), sgd(model))
    sampler = GlobalBatchSampler(len(TASK.dataset), B, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    micro = [TASK.batch(idx) for idx in sampler.micro_batches(plan, rank)]
    acc.step(micro, TASK.loss_fn, global_items=B)
    grads = [b - p.detach() for b, p in zip(before, model.parameters())]  # lr 1: the gradient
    return {"plan": plan.to_json(), "grads": grads, "global_batch": sampler.global_batch()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    os.environ[SIMULATED_ENV] = DEVICES  # the spawned ranks inherit it
    try:
        return run_ranks(rank_main, 3, str(tmp_path_factory.mktemp("profiles")))
    finally:
        del os.environ[SIMULATED_ENV]


def test_every_rank_gets_the_same_ragged_plan_in_group_order(ranks):
    plans = {r["plan"] for r in ranks}
    assert len(plans) == 1
    from autobatch import Plan

    plan = Plan.from_json(plans.pop())
    assert [r.device_id for r in plan.ranks] == ["rank0", "rank1", "rank2"]
    assert [r.device_name for r in plan.ranks] == ["sim-big", "sim-mid", "sim-small"]
    limits = [r.max_micro_batch for r in plan.ranks]
    assert limits[0] > limits[1] > limits[2]  # measured: the bigger device takes more
    assert len({r.accumulation_steps for r in plan.ranks}) > 1  # ragged: no_sync on some
    assert sum(r.samples for r in plan.ranks) == B


def assert_full_batch_gradient(ranks: list[dict]) -> None:
    """Every rank's step equals the mean gradient over the global batch, in one process."""
    model = build()
    x, y = collate([TASK.dataset[int(i)] for i in ranks[0]["global_batch"]])
    (((model(x) - y) ** 2).sum() / B).backward()
    for got in (r["grads"] for r in ranks):
        for g_, p in zip(got, model.parameters()):
            assert (g_ - p.grad).abs().max().item() <= 1e-10


def test_one_step_of_the_group_plan_is_the_full_batch_gradient(ranks):
    assert_full_batch_gradient(ranks)


def test_a_device_list_that_does_not_match_the_group_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(SIMULATED_ENV, "sim-a:1MiB,sim-b:1MiB")
    with pytest.raises(DeviceSpecError, match=r"lists 2 device\(s\) for a process group of 1"):
        plan_for_group(TASK, B, make_optimizer=sgd, cache_dir=str(tmp_path))


def test_a_rank_the_plan_would_leave_out_is_an_error_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv(SIMULATED_ENV, "sim-tiny:1KiB")  # not even one sample fits
    with pytest.raises(PlanError, match=r"not even one sample fits on 1 of 1 rank\(s\): rank 0"):
        plan_for_group(TASK, B, make_optimizer=sgd, cache_dir=str(tmp_path))


def rank_with_a_device_too_small(rank: int, world: int, cache: str) -> str:
    try:
        plan_for_group(TASK, B, make_optimizer=sgd, cache_dir=cache)
    except PlanError as exc:
        return str(exc)
    return "no error"


def test_a_rank_where_one_sample_does_not_fit_fails_every_rank_without_a_hang(tmp_path):
    os.environ[SIMULATED_ENV] = "sim-big:160KiB,sim-tiny:1KiB"
    try:
        messages = run_ranks(rank_with_a_device_too_small, 2, str(tmp_path))
    finally:
        del os.environ[SIMULATED_ENV]
    assert len(set(messages)) == 1  # the same error on both ranks
    assert messages[0].startswith("not even one sample fits on 1 of 2 rank(s): rank 1: sim-tiny")
