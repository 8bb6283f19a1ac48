"""The daemon's job records: SQLite in WAL mode, one row per job, one row per transition.

    queued -> probing -> running <-> restarting -> succeeded | failed | cancelled
       ^________________________________|  (daemon restarted: back to the queue)

`set_state` is the only way a job changes state: it checks the transition is
allowed, writes the new state and a transition row (time, from, to, reason) in
one transaction. Everything else a job carries (plan, progress, restarts, last
error, summary, an elastic job's resizes, its rebalances) is data updated with `update`,
never a state change.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from launcher.errors import StoreError, TransitionError, UnknownJob

STATES = ("queued", "probing", "running", "restarting", "succeeded", "failed", "cancelled")
ACTIVE = ("probing", "running", "restarting")
TERMINAL = ("succeeded", "failed", "cancelled")
_ALLOWED = {
    "queued": {"probing", "cancelled", "failed"},
    "probing": {"running", "failed", "cancelled", "queued"},
    "running": {"restarting", "succeeded", "failed", "cancelled", "queued"},
    "restarting": {"running", "failed", "cancelled", "queued"},
    "succeeded": set(),
    "failed": set(),
    "cancelled": set(),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    plan TEXT,
    progress TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    summary TEXT,
    resizes TEXT,
    rebalances TEXT
);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job_id, seq);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""


@dataclass(frozen=True)
class Transition:
    at: float
    from_state: str | None
    to_state: str
    reason: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    spec: dict[str, Any]
    state: str
    created: float
    updated: float
    plan: dict[str, Any] | None
    progress: dict[str, Any] | None
    restarts: int
    last_error: str | None
    summary: dict[str, Any] | None
    resizes: list[dict[str, Any]] | None = None
    rebalances: list[dict[str, Any]] | None = None  # new splits of the global batch, in order

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def new_job_id(name: str) -> str:
    """A unique id that still reads as the job: 'demo-3f9a1c2e'."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


_JSON_FIELDS = ("plan", "progress", "summary", "resizes", "rebalances")
_UPDATABLE = {"plan", "progress", "restarts", "last_error", "summary", "resizes", "rebalances"}


class JobStore:
    """Thread-safe: one connection, one lock (SQLite serialises writers anyway)."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a crash
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column in ("resizes", "rebalances"):  # a state directory from before them
            if column not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes ----------------------------------------------------------------
    def add(self, job_id: str, name: str, spec: dict[str, Any], reason: str = "submitted") -> str:
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO jobs (id, name, spec, state, created, updated) "
                "VALUES (?, ?, ?, 'queued', ?, ?)",
                (job_id, name, json.dumps(spec), now, now),
            )
            self._db.execute(
                "INSERT INTO transitions (job_id, at, from_state, to_state, reason) "
                "VALUES (?, ?, NULL, 'queued', ?)",
                (job_id, now, reason),
            )
        return job_id

    def set_state(self, job_id: str, state: str, reason: str) -> str:
        """Move a job to `state`, recording when and why; returns the previous state."""
        if state not in STATES:
            raise TransitionError(f"state={state!r} is not one of {', '.join(STATES)}")
        now = time.time()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job with id {job_id!r}")
            old = row[0]
            if state not in _ALLOWED[old]:
                raise TransitionError(f"job {job_id} cannot go from {old} to {state}")
            self._db.execute(
                "UPDATE jobs SET state = ?, updated = ? WHERE id = ?", (state, now, job_id)
            )
            self._db.execute(
                "INSERT INTO transitions (job_id, at, from_state, to_state, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                (job_id, now, old, state, reason),
            )
        return old

    def update(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise StoreError(f"cannot update {sorted(unknown)}; updatable: {sorted(_UPDATABLE)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items()]
        with self._lock, self._db:
            cur = self._db.execute(
                f"UPDATE jobs SET {cols}, updated = ? WHERE id = ?",
                (*values, time.time(), job_id),
            )
            if cur.rowcount == 0:
                raise UnknownJob(f"no job with id {job_id!r}")

    # -- reads -------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job with id {job_id!r}")
        return _record(row)

    def list(self, states: tuple[str, ...] | None = None) -> list[JobRecord]:
        """Jobs in submission order (the queue order), optionally only in `states`."""
        query, args = _SELECT, ()
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = tuple(states)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq", args).fetchall()
        return [_record(r) for r in rows]

    def page(
        self, state: str | None = None, *, limit: int = 100, after: int = 0
    ) -> tuple[list[dict[str, Any]], int | None]:
        """A page of what a job listing shows, in queue order: up to `limit` jobs after the
        cursor `after` (0: from the start), and the cursor of the next page (None: none).

        Keyset pagination on the queue order: a job submitted meanwhile never shifts a page.
        No spec, plan or summary is decoded.
        """
        with self._lock:
            return _page(self._db, state, limit, after)

    def reader(self) -> StoreReader:
        """A connection of its own for the API's reads (see StoreReader)."""
        return StoreReader(self.path)

    def transitions(self, job_id: str) -> list[Transition]:
        self.get(job_id)  # 404 for unknown ids
        with self._lock:
            rows = self._db.execute(
                "SELECT at, from_state, to_state, reason FROM transitions "
                "WHERE job_id = ? ORDER BY seq",
                (job_id,),
            ).fetchall()
        return [Transition(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state present (0 when none)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update(dict(rows))
        return out


class StoreReader:
    """Reads for the API on a connection of their own, never waiting for a writer: in WAL
    mode readers see the last commit while a write goes on. So the event loop reads a page
    or a record directly (a fraction of a millisecond, cheaper than a hop to a thread:
    benchmarks/bench_daemon.py); a write in a job's thread does not stall it."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self._lock = threading.Lock()  # uncontended: the event loop is its one user
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA query_only=ON")
        self._db.execute("PRAGMA busy_timeout=200")  # only while a crashed WAL is recovered

    def page(
        self, state: str | None = None, *, limit: int = 100, after: int = 0
    ) -> tuple[list[dict[str, Any]], int | None]:
        """JobStore.page."""
        with self._lock:
            return _page(self._db, state, limit, after)

    def record(self, job_id: str) -> dict[str, Any]:
        """The job's record with its transitions (one read transaction: consistent)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            row = self._db.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job with id {job_id!r}")
            out = _record(row).to_dict()
            out["transitions"] = [
                dict(zip(("at", "from_state", "to_state", "reason"), t))
                for t in self._db.execute(
                    "SELECT at, from_state, to_state, reason FROM transitions "
                    "WHERE job_id = ? ORDER BY seq",
                    (job_id,),
                )
            ]
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _page(
    db: sqlite3.Connection, state: str | None, limit: int, after: int
) -> tuple[list[dict[str, Any]], int | None]:
    query = (
        "SELECT seq, id, name, state, created, updated, json_extract(progress, '$.step'), "
        "json_extract(progress, '$.total_steps'), restarts, last_error FROM jobs WHERE seq > ?"
    )
    args: tuple = (after,)
    if state:
        query, args = query + " AND state = ?", (after, state)
    rows = db.execute(query + " ORDER BY seq LIMIT ?", (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return [dict(zip(_BRIEF, r[1:])) for r in rows], rows[-1][0] if more else None


_BRIEF = (
    "id", "name", "state", "created", "updated", "step", "total_steps", "restarts", "last_error",
)  # fmt: skip
_SELECT = (
    "SELECT id, name, spec, state, created, updated, plan, progress, restarts, last_error, "
    "summary, resizes, rebalances FROM jobs"
)


def _record(row: tuple) -> JobRecord:
    id_, name, spec, state, created, updated, plan, progress, restarts, err, summary, *more = row
    load = lambda v: json.loads(v) if v is not None else None  # noqa: E731
    return JobRecord(
        id_,
        name,
        json.loads(spec),
        state,
        created,
        updated,
        load(plan),
        load(progress),
        restarts,
        err,
        load(summary),
        *(load(v) for v in more),  # resizes, rebalances
    )
