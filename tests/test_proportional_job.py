"""`sharding: proportional` end to end on a real local Ray: planned slices of the flat
state over gloo ranks on three simulated devices.

The oracle is the same job on one device: a proportional job must end with its
parameters (float32, relative 1e-5) with every global batch exact (the ranks' audit
ledger against the sampler), also when it stops on three ranks and resumes from the
checkpoint (a replica's file) on two, with other slices.
"""

from __future__ import annotations

import pytest
from test_launcher import (
    assert_every_global_batch_exact,
    assert_same_parameters,
    job,
    local_ray,  # noqa: F401 - the module's Ray
    run,
)

from launcher.job.checkpoint import checkpoint_sharding, list_checkpoints
from launcher.job.spec import parse_spec

pytestmark = pytest.mark.slow

ONE = {"select": "simulated", "simulated": [{"name": "sim-1", "memory": "4MiB"}]}
TWO = {
    "select": "simulated",
    "keep_all": True,
    "simulated": [
        {"name": "sim-big", "memory": "300KiB", "speed": 1.0},
        {"name": "sim-small", "memory": "150KiB", "speed": 1.0},
    ],
}


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):  # noqa: F811
    summary, _ = run(job(tmp_path_factory.mktemp("one"), devices=ONE))
    return summary.parameters


def test_a_proportional_job_ends_where_one_device_does(reference, tmp_path):
    spec = job(tmp_path, sharding="proportional")
    summary, _ = run(spec)
    plan = summary.plan
    assert summary.steps == 6 and summary.restarts == 0 and summary.oom_events == 0
    assert plan.sharding == "proportional" and plan.world_size == 3
    assert len({r.accumulation_steps for r in plan.ranks}) == 1  # each micro-step gathers
    assert sum(plan.state_slices) > 0 and all(s >= 0 for s in plan.state_slices)
    assert "share" in plan.table_rows()[0]
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    last = list_checkpoints(tmp_path / "ckpt")[-1]
    assert last.name == "step_00000006.pt" and checkpoint_sharding(last) == "none"
    assert_same_parameters(summary.parameters, reference)


def test_a_proportional_job_stopped_on_three_ranks_resumes_on_two(reference, tmp_path):
    first, _ = run(job(tmp_path, sharding="proportional", max_steps=4))
    assert first.steps == 4 and first.plan.world_size == 3
    second, _ = run(job(tmp_path, sharding="proportional", devices=TWO))
    assert second.plan.world_size == 2 and second.plan.sharding == "proportional"
    assert second.plan.state_slices != first.plan.state_slices
    assert_same_parameters(second.parameters, reference)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        # the loss scaler's inf check would see one rank's slice only
        ("precision: fp16", {"precision": "fp16"}),
        # checkpoints gather AdamW's state only
        ("optimizer.momentum", {"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}),
    ],
)
def test_what_proportional_cannot_do_is_refused_naming_the_field(tmp_path, field, overrides):
    with pytest.raises(ValueError, match=field):
        parse_spec(job(tmp_path, sharding="proportional", **overrides))
