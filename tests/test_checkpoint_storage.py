"""Checkpoints against their storage: retention keeps the newest complete checkpoints (never
the only one), and a write that finds no space, no permission or no file system is a
storage fault: the failure policy fails the job at once, naming the path and what is
missing, instead of restarting it at the same failing step.

The drill runs a job whose checkpoints go to a 4 KiB tmpfs (smaller than one checkpoint)
where the machine lets the test mount one; the test double at the write (a file that
fills up under the real torch.save) always runs.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch
import yaml
from daemon_util import tiny_spec
from test_policy import PLAN

import autobatch.step.atomic as atomic
from autobatch.errors import StorageError
from autobatch.step.atomic import storage_error, write_atomically
from autobatch.step.wrap import REPLICATED
from launcher.cli import main
from launcher.job.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from launcher.job.policy import RankFailure, classify, decide

TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def raised(exc: BaseException, context: BaseException | None = None) -> BaseException:
    """`exc` as Python leaves it when raised while handling `context`."""
    try:
        try:
            if context is not None:
                raise context
        finally:
            raise exc
    except BaseException as got:  # noqa: BLE001 - handed back to the test
        return got


class DcpFailure(BaseException):
    """The shape of torch.distributed.checkpoint's CheckpointException: {rank: (exc, trace)}."""

    def __init__(self, failures: dict) -> None:
        super().__init__("CheckpointException ranks: ...")
        self.failures = failures


@pytest.mark.parametrize(
    "exc, message",
    [
        # what torch.save raises on a full disk: the errno only in the context
        (raised(RuntimeError(TORCH_ENOSPC), OSError(errno.ENOSPC, "full")), "no space left on {d}"),
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on {d}"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "no space left on {d} (its disk quota"),
        (PermissionError(errno.EACCES, "Permission denied"), "no permission to write to {d}"),
        (OSError(errno.EPERM, "Operation not permitted"), "no permission to write to {d}"),
        (OSError(errno.EROFS, "Read-only file system"), "its file system is read-only"),
        (OSError(errno.EIO, "Input/output error"), "{d} is unreachable (input/output error)"),
        (OSError(errno.ESTALE, "Stale file handle"), "{d} is unreachable (a stale"),
        # a sharded checkpoint: DCP wraps each rank's error
        (DcpFailure({1: (OSError(errno.ENOSPC, "full"), None)}), "no space left on {d}"),
        (
            raised(RuntimeError("x"), raised(ValueError("y"), OSError(errno.EROFS, "ro"))),
            "read-only",
        ),
    ],
)
def test_a_storage_fault_names_the_path_and_what_is_missing(tmp_path, exc, message):
    fault = storage_error(tmp_path, exc)
    assert isinstance(fault, StorageError) and fault.path == str(tmp_path)
    assert message.format(d=tmp_path) in str(fault)
    assert classify(fault) == "storage"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("a bug in the task"),  # the file system is fine: not storage
        OSError(errno.ECONNRESET, "Connection reset by peer"),  # a peer, not the disk
        KeyboardInterrupt(),  # an interrupt is never turned into anything else
    ],
)
def test_other_errors_are_no_storage_fault(tmp_path, exc):
    assert storage_error(tmp_path, exc) is None


@pytest.mark.parametrize(
    "flag, free, message",
    [
        (0, 0, "no space left on {d}"),  # nearly full: the write failed for space
        (os.ST_RDONLY, 1 << 30, "its file system is read-only"),
        (0, 1 << 30, None),  # healthy: the error was something else
    ],
)
def test_when_the_errno_is_hidden_the_file_system_is_asked(
    tmp_path, monkeypatch, flag, free, message
):
    # torch.save given a path (C++ writes) hides the errno: 'basic_ios::clear' in the context
    hidden = raised(RuntimeError(TORCH_ENOSPC), RuntimeError("basic_ios::clear: iostream error"))
    fs = SimpleNamespace(f_flag=flag, f_bavail=free // 4096, f_frsize=4096)
    monkeypatch.setattr(atomic.os, "statvfs", lambda path: fs)
    fault = storage_error(tmp_path, hidden)
    assert (fault is None) if message is None else message.format(d=tmp_path) in str(fault)


def test_the_policy_fails_a_storage_fault_at_once_whatever_its_peers_say():
    failures = [
        RankFailure(1, "lost", "rank 1: RuntimeError: Connection closed by peer"),
        RankFailure(0, "storage", "rank 0: StorageError: no space left on /ckpt"),
    ]
    d = decide(failures, restarts=0, max_restarts=3, plan=PLAN)
    assert (d.action, d.cause) == ("fail", "storage")
    assert d.reason.startswith("storage fault (not retried): rank 0: StorageError: no space")
    assert classify(OSError(errno.ENOSPC, "full")) == "storage"  # one that escaped unmapped
    assert classify(ConnectionResetError(errno.ECONNRESET, "reset")) == "lost"


# -- the write, with a test double for a file system that fills up -------------------------


class FillingFile:
    """A file whose file system has `room` bytes left: a write beyond raises ENOSPC."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.fixture
def room_for(monkeypatch):
    """Files written atomically find `room` bytes left (the real torch.save writes them)."""

    def limit(room: int) -> None:
        real = os.fdopen
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FillingFile(real(fd, mode), room))

    return limit


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_torch_save_on_a_full_disk_raises_a_storage_error_and_leaves_nothing(tmp_path, room_for):
    room_for(4096)
    state = {"w": torch.zeros(64, 64)}  # 16 KiB
    with pytest.raises(StorageError, match=f"^no space left on {re.escape(str(tmp_path))}$"):
        write_atomically(tmp_path / "a.pt", lambda f: torch.save(state, f))
    assert list(tmp_path.iterdir()) == []  # the temporary is gone too


def test_a_checkpoint_that_finds_no_space_fails_naming_the_step_and_keeps_the_last_one(
    tmp_path, room_for
):
    model, optimizer = model_and_optimizer()
    state = {"step": 2}
    first = save_checkpoint(tmp_path, 2, REPLICATED, model, optimizer, state)
    room_for(4096)
    with pytest.raises(StorageError) as caught:
        save_checkpoint(tmp_path, 4, REPLICATED, model, optimizer, {"step": 4})
    assert str(caught.value) == f"checkpoint of step 4: no space left on {tmp_path}"
    assert classify(caught.value) == "storage"
    assert list_checkpoints(tmp_path) == [first]  # the complete one stays, nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


# -- retention ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "present, keep, saved, left",
    [
        # the newest `keep` complete checkpoints stay, the older go
        ([1, 2, 3, 4], 2, 5, [4, 5]),
        ([1, 2, 3, 4], 1, 5, [5]),
        # names sort as numbers (8 digits): 10 is newer than 9
        ([8, 9], 2, 10, [9, 10]),
        # the first checkpoint of a job is the only one: it stays
        ([], 1, 1, [1]),
        # a saved step older than what is there (a resumed job that re-saves): by step, not time
        ([6], 1, 3, [6]),
    ],
)
def test_retention_keeps_the_newest_complete_checkpoints(tmp_path, present, keep, saved, left):
    model, optimizer = model_and_optimizer()
    for step in present:
        save_checkpoint(tmp_path, step, REPLICATED, model, optimizer, {}, keep=100)
    save_checkpoint(tmp_path, saved, REPLICATED, model, optimizer, {}, keep=keep)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{s:08d}.pt" for s in left]


def test_retention_never_counts_an_incomplete_checkpoint_so_never_deletes_the_only_complete_one(
    tmp_path,
):
    model, optimizer = model_and_optimizer()
    # What crashed saves leave: a sharded checkpoint's shards not yet renamed, the temporary
    # of a replica's file, the older directory a replace moved aside.
    (tmp_path / "step_00000009.tmp").mkdir()
    (tmp_path / ".tmp-x1y2.pt").write_bytes(b"half")
    (tmp_path / "step_00000008.old").mkdir()
    only = save_checkpoint(tmp_path, 4, REPLICATED, model, optimizer, {"step": 4}, keep=1)
    assert latest_checkpoint(tmp_path) == only
    assert REPLICATED.load(only, *model_and_optimizer())["step"] == 4  # whole and loadable


# -- the drill: a job whose checkpoints go to a small file system ---------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 4 KiB tmpfs (skipped, saying why, where the machine does not allow a mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except OSError as exc:
        pytest.skip(f"cannot run mount here ({exc}); the test double at the write still runs")
    if r.returncode != 0:
        why = r.stderr.strip() or f"exit code {r.returncode}"
        pytest.skip(f"mounting a tmpfs is not permitted here ({why}); the test double runs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_job_checkpointing_to_a_full_file_system_fails_once_saying_no_space(
    small_fs, local_ray, tmp_path, capsys
):
    ckpt = small_fs / "ckpt"
    checkpoints = {"dir": str(ckpt), "interval": 2}
    spec = tiny_spec("full-disk", sims=("big", "mid"), max_steps=4, checkpoint=checkpoints)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    error = " ".join(captured.err.split())  # one line, however the console wrapped it
    assert error.startswith("error: job full-disk: storage fault (not retried): rank 0: ")
    assert f"checkpoint of step 2: no space left on {ckpt}" in error
    assert "restart" not in captured.out  # failed once: no restart at the same failing step
    assert list_checkpoints(ckpt) == []
