"""A job's checkpoints through its wrapping: named by step, rotated, in the wrapping's own
format (unchanged on disk), refused for a job of the other format; the whole model gathered
and made plain for export. One process: the collectives are tests/test_sharding.py's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autobatch.errors import LaunchError
from autobatch.step.shard import Sharded
from autobatch.step.wrap import REPLICATED, ModelWrapping
from launcher.job.checkpoint import (
    checkpoint_sharding,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)

# DCP in one process warns that it assumes one process: that is the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

STATE = {"schedule": {"last_epoch": 3}, "sampler": {"step": 3}, "plan": "{}", "job": "j"}


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model and an optimizer with state (momentum buffers) after one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "wrapping, name",
    [
        (REPLICATED, "step_00000003.pt"),  # one file, written by rank 0
        (Sharded("optimizer"), "step_00000003"),  # a directory of DCP shards
        (Sharded("full"), "step_00000003"),
    ],
)
def test_a_checkpoint_restores_the_model_the_optimizer_and_the_training_state(
    tmp_path, wrapping: ModelWrapping, name: str
):
    model, optimizer = trained(0)
    path = save_checkpoint(tmp_path, 3, wrapping, model, optimizer, STATE)
    assert path == tmp_path / name and checkpoint_step(path) == 3
    fresh, fresh_optimizer = trained(1)
    extra = restore_checkpoint(path, wrapping, fresh, fresh_optimizer)
    assert {k: extra[k] for k in STATE} == STATE
    assert same(fresh.state_dict(), model.state_dict())
    momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(
        torch.equal(a, optimizer.state[p]["momentum_buffer"])
        for a, p in zip(momentum, model.parameters())
    )


def test_a_replica_checkpoint_is_one_torch_file_as_before(tmp_path):
    model, optimizer = trained(0)
    path = save_checkpoint(tmp_path, 3, REPLICATED, model, optimizer, STATE)
    saved = load_checkpoint(path)
    assert list(saved) == [*STATE, "model", "optimizer"]
    assert same(saved["model"], model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt"]  # no temporaries


def test_a_replica_checkpoint_written_before_the_wrapping_owned_it_still_resumes(tmp_path):
    model, optimizer = trained(0)
    old = tmp_path / "step_00000003.pt"  # as launcher/job/checkpoint.py wrote it then
    torch.save({**STATE, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, old)
    fresh, fresh_optimizer = trained(1)
    assert restore_checkpoint(old, REPLICATED, fresh, fresh_optimizer) == STATE
    assert same(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    "saved_by, resumed_by, message",
    [
        (REPLICATED, Sharded("optimizer"), "holds a replica; this job runs sharding optimizer"),
        (Sharded("full"), REPLICATED, "holds a sharded model; this job runs sharding none"),
    ],
)
def test_a_checkpoint_of_the_other_format_is_refused(tmp_path, saved_by, resumed_by, message):
    model, optimizer = trained(0)
    path = save_checkpoint(tmp_path, 3, saved_by, model, optimizer, STATE)
    with pytest.raises(LaunchError, match=f"{message}: resume with the sharding that saved it"):
        restore_checkpoint(path, resumed_by, *trained(1))


@pytest.mark.parametrize("wrapping", [REPLICATED, Sharded("optimizer")])
def test_the_newest_checkpoints_are_kept(tmp_path, wrapping):
    model, optimizer = trained(0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, wrapping, model, optimizer, STATE, keep=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [4, 6]
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 6
    expected = "none" if wrapping is REPLICATED else "sharded"
    assert checkpoint_sharding(latest_checkpoint(tmp_path)) == expected


@pytest.mark.parametrize("wrapping", [REPLICATED, Sharded("optimizer"), Sharded("full")])
def test_the_whole_model_is_gathered_and_made_plain_for_export(wrapping):
    model, _ = trained(0)
    full = wrapping.full_state(model)
    assert same(full, model.state_dict())
    plain = wrapping.plain_model(model, full, lambda: trained(1)[0])
    assert same(plain.state_dict(), model.state_dict())
