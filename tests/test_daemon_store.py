"""The daemon's job records (SQLite, WAL) and its gang scheduler: pure and fast."""

from __future__ import annotations

import sqlite3

import pytest

from launcher.daemon import scheduler
from launcher.daemon.daemon import Daemon
from launcher.daemon.scheduler import Need
from launcher.daemon.store import JobStore
from launcher.errors import TransitionError, UnknownJob
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


def sim(*names: str, count: int = 1, min_count: int | None = None, priority: int = 0) -> Need:
    spec = {
        "name": "j", "global_batch_size": 8, "max_steps": 1, "priority": priority,
        "devices": {"select": "simulated", "min_count": min_count,
                    "simulated": [{"name": n, "memory": "1MiB", "count": count} for n in names]},
    }  # fmt: skip
    return scheduler.need(parse_spec(spec))


def gpus(
    select: str, count: int | None = None, min_count: int | None = None, priority: int = 0
) -> Need:
    devices = {"select": select, "min_count": min_count} | ({"count": count} if count else {})
    return scheduler.need(parse_spec({"name": "j", "global_batch_size": 8, "max_steps": 1,
                                      "devices": devices, "priority": priority}))  # fmt: skip


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
    assert [j for j, _ in pick(queue, busy, total_gpus)] == started


def pick(queue, busy, total_gpus) -> list:
    other = scheduler.Running("other", scheduler.Need(), frozenset(busy))
    moves = scheduler.schedule(queue, [other], total_gpus)
    assert moves.resizes == []
    return moves.starts


def test_a_started_job_takes_all_its_slots():
    [(job, slots)] = pick([("a", sim("x", "y", count=2))], set(), 0)
    assert slots == {"sim:x#0", "sim:x#1", "sim:y#0", "sim:y#1"}
    assert (
        scheduler.unsatisfiable(gpus("count", 8), 4)
        == "the job asks for 8 GPU(s) but the cluster has 4"
    )


# -- elastic jobs: start on min_count, grow, shrink for the head of the queue -------------
Running = scheduler.Running
D3 = ("sim:d#0", "sim:d#1", "sim:d#2")


def moves(queue, running, total_gpus=0) -> tuple[list, list]:
    m = scheduler.schedule(queue, running, total_gpus)
    return (
        [(j, sorted(s)) for j, s in m.starts],
        [(r.job_id, sorted(r.slots), r.reason, r.why) for r in m.resizes],
    )


def test_an_elastic_job_starts_on_the_free_devices_when_min_count_are():
    fixed = Running("f", sim("d"), frozenset({"sim:d#0"}))
    assert moves([("e", sim("d", count=3, min_count=2))], [fixed]) == (
        [("e", ["sim:d#1", "sim:d#2"])], [],
    )  # fmt: skip
    assert moves([("e", sim("d", count=3, min_count=3))], [fixed]) == ([], [])


def test_a_fixed_job_shrinks_an_elastic_one_to_start():
    elastic = Running("e", sim("d", count=3, min_count=1), frozenset(D3))
    assert moves([("f", sim("d"))], [elastic]) == (
        [], [("e", ["sim:d#1", "sim:d#2"], "shrank", "shrank for job f")],
    )  # fmt: skip
    # once the shrink is under way, no second one; the job starts when it is done
    shrinking = Running("e", elastic.need, frozenset(D3), True, frozenset({"sim:d#0"}))
    assert moves([("f", sim("d"))], [shrinking]) == ([], [])
    done = Running("e", elastic.need, frozenset(D3[1:]))
    assert moves([("f", sim("d"))], [done]) == ([("f", ["sim:d#0"])], [])


def test_shrinking_keeps_min_count_and_only_when_the_head_can_then_start():
    e = Running("e", gpus("count", 4, min_count=3), frozenset(f"gpu#{i}" for i in range(4)))
    assert moves([("f", gpus("count", 2))], [e], 4) == ([], [])  # 1 spare, 2 needed
    got = moves([("f", gpus("count", 1))], [e], 4)
    assert got == ([], [("e", ["gpu#0", "gpu#1", "gpu#2"], "shrank", "shrank for job f")])


def test_lowest_priority_shrinks_first_and_a_higher_priority_never():
    low = Running("low", gpus("count", 2, min_count=1, priority=-1), frozenset({"gpu#0", "gpu#1"}))
    mid = Running("mid", gpus("count", 2, min_count=1), frozenset({"gpu#2", "gpu#3"}))
    assert moves([("f", gpus("count", 1))], [mid, low], 4)[1] == [
        ("low", ["gpu#0"], "shrank", "shrank for job f")
    ]
    high = Running("high", gpus("count", 4, min_count=1, priority=5),
                   frozenset(f"gpu#{i}" for i in range(4)))  # fmt: skip
    assert moves([("f", gpus("count", 1))], [high], 4) == ([], [])


def test_queued_jobs_go_by_priority_then_in_order():
    queue = [("a", sim("d")), ("b", sim("d", priority=1)), ("c", sim("d", priority=1))]
    assert moves(queue, [])[0] == [("b", ["sim:d#0"])]


def test_an_elastic_job_grows_into_free_devices_no_waiting_job_holds():
    e = Running("e", sim("d", count=3, min_count=1), frozenset({"sim:d#0"}))
    assert moves([], [e]) == ([], [("e", list(D3), "grew", "grew into freed devices "
                                    "(sim:d#1, sim:d#2)")])  # fmt: skip
    # a job waiting for d#0..2 (held by e down to its minimum) holds d#1, d#2: no growing
    assert moves([("f", sim("d", count=3))], [e]) == ([], [])
    # a fixed job that fits starts first; e grows into what is left
    assert moves([("f", sim("d"))], [Running("e", e.need, frozenset())])[0] == [("f", ["sim:d#0"])]


def test_elastic_slots_map_to_the_spec_devices():
    n = sim("a", "b", count=2, min_count=1)
    assert n.named == ("sim:a#0", "sim:a#1", "sim:b#0", "sim:b#1")
    assert n.devices(frozenset({"sim:b#1", "sim:a#1"})) == [1, 3]
    assert n.slots_of([1, 3], frozenset()) == {"sim:a#1", "sim:b#1"}
    g = gpus("count", 3, min_count=1)
    assert g.devices(frozenset({"gpu#5", "gpu#2"})) == [0, 1]
    assert g.slots_of([0], frozenset({"gpu#5", "gpu#2"})) == {"gpu#2"}


def test_a_rebalance_reported_again_by_a_resumed_run_is_recorded_once(store):
    # A re-queued job's new run resumes from a checkpoint that carries its rebalances so
    # far, and its rank 0 reports them again: the job's record keeps each one once.
    from daemon_util import tiny_spec

    from autobatch.metrics.prometheus import PrometheusSink
    from launcher.daemon.jobwatch import JobWatcher
    from launcher.job.events import Rebalanced

    class Host:
        sink, metrics_url, lines = PrometheusSink(), "", []

        def __init__(self, store):
            self.store = store

        def log(self, job_id, line):
            self.lines.append(line)

    spec = parse_spec(tiny_spec("rb"))
    store.add("rb-1", "rb", spec.model_dump(mode="json"))
    first = Rebalanced(16, 0.338, 0.276, (1.5, 1.1, 2.0), ((33, 33, 33), (12, 12), (5,)))
    later = Rebalanced(60, 0.276, 0.250, (1.2, 1.0, 1.0), ((34, 34, 34), (11, 11), (4,)))
    run_1 = JobWatcher(Host(store), "rb-1", spec)
    run_1(first)
    run_2 = JobWatcher(Host(store), "rb-1", spec)  # the run after the re-queue
    run_2(first)
    run_2(later)
    assert [(r["step"], r["after_s"]) for r in store.get("rb-1").rebalances] == [
        (16, 0.276), (60, 0.250),
    ]  # fmt: skip
