"""Checkpoints written in the background (`checkpoint.async`, the default): the training loop
waits only for the copy to host memory; the write goes on in a thread.

- What is written is the state at the save, whatever the loop does next.
- A checkpoint counts only when complete: while its write is in flight (held open here at
  the fault seam, an Event, no sleep) it is not listed, has no marker, and the previous one
  is the latest; once the write completes it is, and retention has run.
- A write that fails in the background surfaces, at the next save or at the end, as the
  StorageError the synchronous path raises (the same message).
- Jobs: kill -9 of a rank while a background write is in flight (`crash_in_save`) resumes
  from the previous complete checkpoint, never the partial one, and ends with the
  parameters of an uninterrupted synchronous run, every global batch exact.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
from test_checkpoint_storage import model_and_optimizer, room_for, small_fs  # noqa: F401
from test_launcher import (
    assert_every_global_batch_exact,
    assert_restart_resumed_at,
    assert_same_parameters,
    job,
    local_ray,  # noqa: F401 - the module's Ray
    run,
)

from autobatch.errors import StorageError
from autobatch.step import storage
from autobatch.step.dcp import COMMIT_FILE
from autobatch.step.shard import Sharded
from autobatch.step.wrap import REPLICATED
from launcher.job.checkpoint import (
    begin_checkpoint,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from launcher.job.policy import classify

WRAPPINGS = {"replica": REPLICATED, "sharded": Sharded("optimizer")}


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", list(WRAPPINGS))
def test_a_background_save_writes_the_state_at_the_save_not_what_training_does_next(tmp_path, kind):
    wrapping = WRAPPINGS[kind]
    model, optimizer = model_and_optimizer()
    saved = state_of(model)
    pending = begin_checkpoint(tmp_path, 2, wrapping, model, optimizer, {"step": 2})
    with torch.no_grad():  # the next step changes the parameters in place, at once
        for p in model.parameters():
            p.add_(1.0)
    path = pending.wait()
    fresh, fresh_optimizer = model_and_optimizer()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert restore_checkpoint(path, wrapping, fresh, fresh_optimizer)["step"] == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert pending.write_s is not None and pending.write_s >= 0


@pytest.mark.parametrize(
    "kind, store",
    [
        ("replica", "local"),
        ("sharded", "local"),
        ("sharded", "s3"),  # on an object store only the marker says it is whole
    ],
)
def test_a_checkpoint_counts_only_once_its_background_write_is_complete(
    request, tmp_path, kind, store
):
    wrapping = WRAPPINGS[kind]
    if store == "s3":
        where: object = f"s3://{request.getfixturevalue('s3').bucket}/ckpt"
    else:
        where = tmp_path / "ckpt"
    model, optimizer = model_and_optimizer()
    first = save_checkpoint(where, 2, wrapping, model, optimizer, {"step": 2}, keep=1)
    in_flight, release = threading.Event(), threading.Event()

    def mid_write() -> None:  # in the writing thread: this rank's part written, not complete
        in_flight.set()
        assert release.wait(60), "the test never released the write"

    pending = begin_checkpoint(
        where, 4, wrapping, model, optimizer, {"step": 4}, keep=1, before_commit=mid_write
    )
    assert in_flight.wait(60), "the write never reached the middle"
    try:
        assert latest_checkpoint(where) == first  # not listed, not resumable
        assert not pending.done()
        name = f"step_00000004{wrapping.checkpoint_suffix}"
        if kind == "sharded":
            store = storage.Storage(where)
            assert not store.exists(f"{name}/{COMMIT_FILE}")  # no marker while in flight
        else:
            assert not storage.Storage(where).exists(name)
    finally:
        release.set()
    path = pending.wait()
    assert checkpoint_name(path) == checkpoint_name(latest_checkpoint(where))
    # retention ran once the write completed: keep=1 leaves the new one only
    assert [checkpoint_name(c) for c in list_checkpoints(where)] == [checkpoint_name(path)]


def test_a_background_write_that_finds_no_space_raises_the_synchronous_paths_storage_error(
    tmp_path,
    room_for,  # noqa: F811
):
    model, optimizer = model_and_optimizer()
    first = save_checkpoint(tmp_path, 2, REPLICATED, model, optimizer, {"step": 2})
    room_for(4096)
    pending = begin_checkpoint(tmp_path, 4, REPLICATED, model, optimizer, {"step": 4})
    with pytest.raises(StorageError) as in_background:
        pending.wait()  # where the next save (or the end of the attempt) waits for it
    with pytest.raises(StorageError) as synchronous:
        save_checkpoint(tmp_path, 4, REPLICATED, model, optimizer, {"step": 4})
    assert str(in_background.value) == str(synchronous.value)
    assert str(in_background.value) == f"checkpoint of step 4: no space left on {tmp_path}"
    assert classify(in_background.value) == "storage"  # the policy fails the job at once
    assert list_checkpoints(tmp_path) == [first]


def test_a_sharded_background_write_to_a_full_file_system_raises_a_storage_error(small_fs):  # noqa: F811
    model, optimizer = model_and_optimizer()
    pending = begin_checkpoint(small_fs, 2, Sharded("optimizer"), model, optimizer, {})
    message = f"checkpoint of step 2: no space left on {small_fs}"
    with pytest.raises(StorageError, match=f"^{re.escape(message)}$"):
        pending.wait()
    assert list_checkpoints(small_fs) == []


# -- jobs: kill -9 while a background write is in flight ---------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory):  # noqa: F811
    """The job run with synchronous saves and no fault: the parameters to end with."""
    tmp = tmp_path_factory.mktemp("sync")
    synchronous = {"dir": str(tmp / "ckpt"), "interval": 2, "async": False}
    summary, _ = run(job(tmp, checkpoint=synchronous))
    return summary.parameters


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding, rank",
    [
        # rank 0 writes a replica's file: killed with it written and not yet renamed
        ("none", 0),
        # rank 1's shards written, not yet reported: neither DCP's metadata nor the marker
        ("optimizer", 1),
    ],
)
def test_kill_9_while_a_background_write_is_in_flight_resumes_from_the_complete_one(
    uninterrupted, tmp_path, sharding, rank
):
    fault = {"kind": "crash_in_save", "rank": rank, "step": 4}
    spec = job(tmp_path, sharding=sharding, faults=[fault])
    summary, _ = run(spec)
    assert summary.steps == 6 and summary.restarts == 1
    assert_restart_resumed_at(tmp_path / "ckpt", 2)  # never at the partial step 4
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    assert [checkpoint_name(c) for c in list_checkpoints(tmp_path / "ckpt")][-1].startswith(
        "step_00000006"
    )
    assert_same_parameters(summary.parameters, uninterrupted)
