"""Snapshots as Prometheus metrics: the families of docs/metrics.md, one sink, /metrics.

`PrometheusSink` keeps the latest snapshot of every (job, rank), labelled
`job_id`, `rank`, `node`, `device`, `device_uuid` (`snapshot.LABELS`), accumulates
the step-duration histogram from the durations each snapshot carries, and
exposes them on its own `CollectorRegistry` (`sink.registry`), as text
(`render()`) or over HTTP (`serve()`).

Elastic jobs (their ranks change during a run): the job's world size and its
resizes by reason are per-job families (label `job_id` only), from the job's
latest rank-0 snapshot, as are its rebalances; every known reason (`snapshot.RESIZE_REASONS`) is
exposed from 0, so `increase()` sees a job's first resize. When rank 0 reports
a new world size W, the series of that job's ranks >= W are dropped: a shrunk
job's lost ranks leave /metrics.

Scrape speed: the daemon holds thousands of ranks, so each series' label text
is escaped once, at push time, and `render()` writes the exposition directly
instead of going through `generate_latest` (about 10x slower here). The
`Collector` interface (`collect()`) yields the same families from the same
table, for registries that merge several collectors; a test checks that both
paths expose the same samples.

The families themselves (names, snapshot fields, HELP) are `autobatch.metrics.families`;
the HTTP server behind `serve()` is `autobatch.metrics.server`.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import attrgetter

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from autobatch.metrics.families import (
    COUNTERS,
    GAUGES,
    JOBS,
    METRIC_NAMES,
    REBALANCES,
    REPLANS,
    RESIZES,
    STEP,
    WORLD,
)
from autobatch.metrics.server import MetricsServer
from autobatch.metrics.snapshot import LABELS, RESIZE_REASONS, RankSnapshot

__all__ = ["DEFAULT_STEP_BUCKETS_S", "METRIC_NAMES", "MetricsServer", "PrometheusSink"]

# Step times span a tiny CPU model (ms) to a large fine-tune (minutes).
DEFAULT_STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _num(value: float | int) -> str:
    if type(value) is int:
        return str(value)
    return floatToGoString(value)


@dataclass(frozen=True)
class _Series:
    """One (job, rank): its latest snapshot, label text, and histogram so far."""

    snapshot: RankSnapshot
    values: tuple[str, ...]
    text: str  # 'job_id="a",rank="0",...', escaped once
    buckets: tuple[int, ...]  # cumulative counts, one per bound, then +Inf
    duration_sum: float
    # rank 0 only, else empty: 'job_id="a"', and the job's resizes as (reason, label text, n)
    job_text: str = ""
    resizes: tuple[tuple[str, str, int], ...] = ()


class PrometheusSink:
    """Latest snapshot per (job, rank), exposed as Prometheus metrics.

    Thread-safe: ranks (or the daemon's API threads) push while scrapes render.
    Also a prometheus_client Collector (`collect`, `describe`) registered on its
    own `registry`, never on the global default one.
    """

    def __init__(self, *, buckets: Sequence[float] = DEFAULT_STEP_BUCKETS_S) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or not math.isfinite(bounds[-1]):
            raise ValueError(f"buckets={buckets!r} must be finite, increasing and non-empty")
        self._bounds = bounds
        self._le = tuple(floatToGoString(b) for b in bounds) + ("+Inf",)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, int], _Series] = {}
        self._world: dict[str, int] = {}  # job -> the world size its rank 0 last reported
        self._job_states: Mapping[str, int] | Callable[[], Mapping[str, int]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- input ---------------------------------------------------------------
    def push(self, snapshot: RankSnapshot) -> None:
        s = snapshot
        values = (s.job, str(s.rank), s.node, s.device, s.device_uuid)
        counts = [0] * (len(self._bounds) + 1)
        for d in s.step_durations_s:
            counts[bisect_left(self._bounds, d)] += 1
        key = (s.job, s.rank)
        with self._lock:
            old = self._series.get(key)
            if old is not None and old.values == values:  # same series: keep counting
                buckets = tuple(a + b for a, b in zip(old.buckets, accumulate(counts), strict=True))
                total = old.duration_sum + sum(s.step_durations_s)
                text = old.text
            else:  # new rank, or the rank moved to another node/device: a new series
                buckets, total = tuple(accumulate(counts)), sum(s.step_durations_s)
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(LABELS, values, strict=True))
            job_text, resizes = "", ()
            if s.rank == 0:  # the job's own series
                if old is not None and old.job_text:
                    job_text = old.job_text
                else:
                    job_text = f'{LABELS[0]}="{_escape(s.job)}"'
                if old is not None and old.snapshot.resizes_total == s.resizes_total:
                    resizes = old.resizes
                else:
                    counts_by = {r: 0 for r in RESIZE_REASONS} | dict(s.resizes_total)
                    resizes = tuple(
                        (r, f'{job_text},reason="{_escape(r)}"', n) for r, n in counts_by.items()
                    )
                if self._world.get(s.job) != s.world_size:  # resized: drop the ranks it lost
                    self._world[s.job] = s.world_size
                    for k in [k for k in self._series if k[0] == s.job and k[1] >= s.world_size]:
                        del self._series[k]
            self._series[key] = _Series(s, values, text, buckets, total, job_text, resizes)

    def set_job_states(self, states: Mapping[str, int] | Callable[[], Mapping[str, int]]) -> None:
        """Counts of jobs by state for `autobatch_jobs{state}`: a mapping, or a
        callable asked at every scrape."""
        self._job_states = states

    def drop_job(self, job: str) -> int:
        """Forget a finished job's ranks; returns how many were dropped."""
        with self._lock:
            keys = [k for k in self._series if k[0] == job]
            for k in keys:
                del self._series[k]
            self._world.pop(job, None)
        return len(keys)

    def snapshots(self) -> list[RankSnapshot]:
        with self._lock:
            return [s.snapshot for s in self._series.values()]

    def _state(self) -> tuple[list[_Series], Mapping[str, int]]:
        with self._lock:
            series = list(self._series.values())
        states = self._job_states() if callable(self._job_states) else self._job_states
        return series, states

    # -- text exposition ---------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        series, states = self._state()
        out: list[str] = []
        add = out.append

        def header(name: str, help_: str, typ: str) -> None:
            add(f"# HELP {name} {help_}\n# TYPE {name} {typ}\n")

        for name, attr, help_ in GAUGES:
            header(name, help_, "gauge")
            get = attrgetter(attr)
            for s in series:
                v = get(s.snapshot)
                if v is not None:
                    add(f"{name}{{{s.text}}} {_num(v)}\n")
        for base, attr, help_ in COUNTERS:
            name = base + "_total"
            header(name, help_, "counter")
            get = attrgetter(attr)
            out.extend(f"{name}{{{s.text}}} {_num(get(s.snapshot))}\n" for s in series)
        name = REPLANS[0] + "_total"
        header(name, REPLANS[1], "counter")
        for s in series:
            for reason, n in s.snapshot.replans_total.items():
                add(f'{name}{{{s.text},reason="{_escape(reason)}"}} {_num(n)}\n')
        leaders = [s for s in series if s.job_text]  # each job's rank 0
        header(WORLD[0], WORLD[1], "gauge")
        out.extend(f"{WORLD[0]}{{{s.job_text}}} {s.snapshot.world_size}\n" for s in leaders)
        name = RESIZES[0] + "_total"
        header(name, RESIZES[1], "counter")
        for s in leaders:
            out.extend(f"{name}{{{text}}} {_num(n)}\n" for _, text, n in s.resizes)
        name = REBALANCES[0] + "_total"
        header(name, REBALANCES[1], "counter")
        out.extend(f"{name}{{{s.job_text}}} {s.snapshot.rebalances_total}\n" for s in leaders)
        name = STEP[0]
        header(name, STEP[1], "histogram")
        for s in series:
            pairs = zip(self._le, s.buckets, strict=True)
            out.extend(f'{name}_bucket{{{s.text},le="{le}"}} {n}\n' for le, n in pairs)
            add(f"{name}_count{{{s.text}}} {s.buckets[-1]}\n")
            add(f"{name}_sum{{{s.text}}} {_num(s.duration_sum)}\n")
        header(JOBS[0], JOBS[1], "gauge")
        for state, n in states.items():
            add(f'{JOBS[0]}{{state="{_escape(state)}"}} {_num(n)}\n')
        return "".join(out).encode()

    # -- Collector interface ---------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        series, states = self._state()
        for name, attr, help_ in GAUGES:
            fam = GaugeMetricFamily(name, help_, labels=LABELS)
            get = attrgetter(attr)
            for s in series:
                if (v := get(s.snapshot)) is not None:
                    fam.add_metric(s.values, v)
            yield fam
        for name, attr, help_ in COUNTERS:
            fam = CounterMetricFamily(name, help_, labels=LABELS)
            get = attrgetter(attr)
            for s in series:
                fam.add_metric(s.values, get(s.snapshot))
            yield fam
        fam = CounterMetricFamily(*REPLANS, labels=(*LABELS, "reason"))
        for s in series:
            for reason, n in s.snapshot.replans_total.items():
                fam.add_metric((*s.values, reason), n)
        yield fam
        leaders = [s for s in series if s.job_text]  # each job's rank 0
        world = GaugeMetricFamily(*WORLD, labels=LABELS[:1])
        resizes = CounterMetricFamily(*RESIZES, labels=(LABELS[0], "reason"))
        rebalances = CounterMetricFamily(*REBALANCES, labels=LABELS[:1])
        for s in leaders:
            world.add_metric(s.values[:1], s.snapshot.world_size)
            for reason, _, n in s.resizes:
                resizes.add_metric((s.values[0], reason), n)
            rebalances.add_metric(s.values[:1], s.snapshot.rebalances_total)
        yield world
        yield resizes
        yield rebalances
        hist = HistogramMetricFamily(*STEP, labels=LABELS)
        for s in series:
            hist.add_metric(s.values, list(zip(self._le, s.buckets, strict=True)), s.duration_sum)
        yield hist
        jobs = GaugeMetricFamily(*JOBS, labels=("state",))
        for state, n in states.items():
            jobs.add_metric((state,), n)
        yield jobs

    def describe(self) -> list[Metric]:
        """Names only (no samples), so the registry can detect clashes cheaply."""
        return [
            *(GaugeMetricFamily(n, h) for n, _, h in GAUGES),
            *(CounterMetricFamily(n, h) for n, _, h in COUNTERS),
            CounterMetricFamily(*REPLANS),
            GaugeMetricFamily(*WORLD),
            CounterMetricFamily(*RESIZES),
            CounterMetricFamily(*REBALANCES),
            HistogramMetricFamily(*STEP),
            GaugeMetricFamily(*JOBS),
        ]

    # -- HTTP ------------------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[MetricsServer, int]:
        """Serve GET /metrics in a background thread; port 0 picks a free port."""
        server = MetricsServer(self, host, port)
        return server, server.port
