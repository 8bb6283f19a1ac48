"""The daemon's job records (SQLite, WAL) and its gang scheduler: pure and fast."""

from __future__ import annotations

import sqlite3

import pytest

from launcher.daemon import scheduler
from launcher.daemon.daemon import Daemon
from launcher.daemon.scheduler import Need
from launcher.daemon.store import JobStore, TransitionError, UnknownJob
from launcher.job.spec import parse_spec


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def test_every_transition_is_recorded_with_time_and_reason(store):
    store.add("j-1", "j", {"name": "j"})
    store.set_state("j-1", "probing", "devices free")
    store.set_state("j-1", "running", "plan ready")
    store.set_state("j-1", "restarting", "rank 1 died")
    store.set_state("j-1", "running", "training again")
    store.set_state("j-1", "succeeded", "6 steps")
    ts = store.transitions("j-1")
    assert [(t.from_state, t.to_state, t.reason) for t in ts] == [
        (None, "queued", "submitted"),
        ("queued", "probing", "devices free"),
        ("probing", "running", "plan ready"),
        ("running", "restarting", "rank 1 died"),
        ("restarting", "running", "training again"),
        ("running", "succeeded", "6 steps"),
    ]
    assert all(a.at <= b.at for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize(
    "path, state, message",
    [
        (["probing", "running", "succeeded"], "running", "cannot go from succeeded to running"),
        ([], "running", "cannot go from queued to running"),  # must be probed first
        (["cancelled"], "queued", "cannot go from cancelled to queued"),
        ([], "sleeping", "state='sleeping' is not one of queued, probing"),
    ],
)
def test_forbidden_transitions_are_refused(store, path, state, message):
    store.add("j-1", "j", {})
    for s in path:
        store.set_state("j-1", s, "test")
    with pytest.raises(TransitionError, match=message):
        store.set_state("j-1", state, "test")


def test_unknown_ids(store):
    with pytest.raises(UnknownJob, match="no job with id 'x'"):
        store.get("x")
    with pytest.raises(UnknownJob, match="no job with id 'x'"):
        store.set_state("x", "probing", "r")
    with pytest.raises(UnknownJob, match="no job with id 'x'"):
        store.update("x", restarts=1)


def test_records_survive_reopening_and_the_journal_is_wal(tmp_path):
    s = JobStore(tmp_path / "jobs.db")
    s.add("a-1", "a", {"k": [1, 2]})
    s.update("a-1", plan={"ranks": 3}, restarts=2, last_error="boom")
    s.close()  # no clean shutdown needed either: every write is its own transaction
    again = JobStore(tmp_path / "jobs.db")
    rec = again.get("a-1")
    assert (rec.spec, rec.plan, rec.restarts, rec.last_error) == (
        {"k": [1, 2]},
        {"ranks": 3},
        2,
        "boom",
    )
    assert again.counts()["queued"] == 1 and again.counts()["running"] == 0
    mode = sqlite3.connect(tmp_path / "jobs.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again.close()


def test_pages_follow_the_queue_order_from_a_cursor(store):
    for i in range(7):
        store.add(f"j-{i}", "j", {})
    store.set_state("j-2", "cancelled", "test")
    store.update("j-3", progress={"step": 4, "total_steps": 10})
    rows, cursor = store.page(limit=3)
    assert [r["id"] for r in rows] == ["j-0", "j-1", "j-2"] and cursor == 3  # seq of j-2
    rows, cursor = store.page(limit=3, after=cursor)
    assert [r["id"] for r in rows] == ["j-3", "j-4", "j-5"]
    assert (rows[0]["step"], rows[0]["total_steps"]) == (4, 10)
    rows, cursor = store.page(limit=3, after=cursor)
    assert [r["id"] for r in rows] == ["j-6"] and cursor is None
    rows, cursor = store.page(limit=6)  # exactly the rest: no empty page after it
    assert len(rows) == 6 and cursor == 6
    assert store.page(limit=6, after=cursor) == ([store.page(after=6)[0][0]], None)
    queued, cursor = store.page("queued", limit=2, after=2)  # a state, from a cursor
    assert [r["id"] for r in queued] == ["j-3", "j-4"] and cursor == 5
    assert store.page("running") == ([], None)


def test_a_restarted_daemon_requeues_active_jobs_and_says_why(tmp_path):
    from daemon_util import tiny_spec

    first = Daemon(tmp_path, run_jobs=False)
    ids = [first.submit(tiny_spec(n)) for n in ("p", "r", "q", "done")]
    first.store.set_state(ids[0], "probing", "devices free")
    for s in ("probing", "running"):
        first.store.set_state(ids[1], s, "x")
    for s in ("probing", "running", "succeeded"):
        first.store.set_state(ids[3], s, "x")
    # no shutdown: the process "dies" here
    second = Daemon(tmp_path, run_jobs=False)
    assert second.recover() == ids[:2]
    states = {i: second.store.get(i).state for i in ids}
    assert states == {ids[0]: "queued", ids[1]: "queued", ids[2]: "queued", ids[3]: "succeeded"}
    last = second.store.transitions(ids[1])[-1]
    assert (
        last.reason == "daemon restarted while the job was running: no checkpoint yet: restarting"
    )


def sim(*names: str, count: int = 1) -> Need:
    spec = {
        "name": "j", "global_batch_size": 8, "max_steps": 1,
        "devices": {"select": "simulated",
                    "simulated": [{"name": n, "memory": "1MiB", "count": count} for n in names]},
    }  # fmt: skip
    return scheduler.need(parse_spec(spec))


def gpus(select: str, count: int | None = None) -> Need:
    devices = {"select": select} | ({"count": count} if count else {})
    return scheduler.need(parse_spec({"name": "j", "global_batch_size": 8, "max_steps": 1,
                                      "devices": devices}))  # fmt: skip


@pytest.mark.parametrize(
    "queue, busy, total_gpus, started",
    [
        # disjoint simulated devices start together
        ([("a", sim("x")), ("b", sim("y"))], set(), 0, ["a", "b"]),
        # the same device: the second waits
        ([("a", sim("x", "y")), ("b", sim("y"))], set(), 0, ["a"]),
        # a busy device blocks its job; a later job on free devices still starts
        ([("a", sim("x")), ("b", sim("y"))], {"sim:x#0"}, 0, ["b"]),
        # ... but not one that needs what an earlier waiting job needs (no overtaking)
        ([("a", sim("x", "y")), ("b", sim("y"))], {"sim:x#0"}, 0, []),
        # count: 2 is two slots of the name
        ([("a", sim("x", count=2)), ("b", sim("x"))], set(), 0, ["a"]),
        # GPUs by count: 2 + 2 of 4 fit, a third pair waits
        ([("a", gpus("count", 2)), ("b", gpus("count", 2)), ("c", gpus("count", 2))], set(), 4,
         ["a", "b"]),
        # all GPUs: waits for every GPU to be free
        ([("a", gpus("all"))], {"gpu#3"}, 4, []),
        # a job that can never fit does not start (the daemon fails it)
        ([("a", gpus("count", 8)), ("b", gpus("count", 1))], set(), 4, ["b"]),
    ],
)  # fmt: skip
def test_gang_scheduling(queue, busy, total_gpus, started):
    assert [j for j, _ in scheduler.pick(queue, busy, total_gpus)] == started


def test_a_started_job_takes_all_its_slots():
    [(job, slots)] = scheduler.pick([("a", sim("x", "y", count=2))], set(), 0)
    assert slots == {"sim:x#0", "sim:x#1", "sim:y#0", "sim:y#1"}
    assert (
        scheduler.unsatisfiable(gpus("count", 8), 4)
        == "the job asks for 8 GPU(s) but the cluster has 4"
    )
