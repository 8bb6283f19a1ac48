"""The Accelerate integration through its own door: an Accelerator on three gloo ranks,
a ragged plan from plan_for_group, one step equal to the full-batch gradient (float64)."""

from __future__ import annotations

import os

import pytest
from distributed import run_ranks
from test_group import DEVICES, TASK, B, assert_full_batch_gradient, build, sgd

from autobatch import Accumulator, GlobalBatchSampler, plan_for_group
from autobatch.probe.group import SIMULATED_ENV

accelerate = pytest.importorskip("accelerate")  # the 'accelerate' extra; `make` installs it
AccelerateWrapping = pytest.importorskip("autobatch.integrations.accelerate").AccelerateWrapping


def rank_main(rank: int, world: int, cache: str) -> dict:
    # What torchrun or `accelerate launch` would have set; the group is already up.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    accelerator = accelerate.Accelerator(cpu=True)
    plan = plan_for_group(TASK, B, make_optimizer=sgd, keep_all=True, cache_dir=cache)
    model = build()
    wrapping = AccelerateWrapping(accelerator)
    wrapped = wrapping.wrap(model, accelerator.device)
    acc = Accumulator(wrapped, accelerator.prepare(sgd(model)), wrapping=wrapping)
    sampler = GlobalBatchSampler(len(TASK.dataset), B, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    acc.step(
        [TASK.batch(i) for i in sampler.micro_batches(plan, rank)], TASK.loss_fn, global_items=B
    )
    return {
        "wrapped": type(wrapped).__name__,
        "micro_steps": plan.ranks[rank].accumulation_steps,
        "grads": [b - p.detach() for b, p in zip(before, model.parameters())],
        "global_batch": sampler.global_batch(),
    }


def test_accelerate_prepared_model_gives_the_full_batch_gradient(tmp_path):
    os.environ[SIMULATED_ENV] = DEVICES
    try:
        ranks = run_ranks(rank_main, 3, str(tmp_path))
    finally:
        del os.environ[SIMULATED_ENV]
    assert {r["wrapped"] for r in ranks} == {"DistributedDataParallel"}
    assert len({r["micro_steps"] for r in ranks}) > 1  # ranks ran different numbers
    assert_full_batch_gradient(ranks)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4\): leave it at 1"),
        ({"mixed_precision": "bf16"}, r"mixed_precision='bf16'\): leave it at 'no'"),
    ],
)
def test_accelerate_settings_that_would_break_the_step_are_refused(kwargs, match):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per process
    try:
        accelerator = accelerate.Accelerator(cpu=True, **kwargs)
        with pytest.raises(ValueError, match=match):
            AccelerateWrapping(accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
