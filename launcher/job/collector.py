"""Where one job's ranks push their metrics snapshots: a small actor on the driver's node.

Under `autobatch run` it serves them on its own /metrics. Under the daemon it
serves nothing: the daemon drains the snapshots in order into its one Prometheus
target (so the step histogram sees every step), labelled with the job id.
Either way the runner reads the latest snapshot of every rank for progress.

It also carries the runner's one directive to an elastic job's ranks: stop at the
next optimizer-step boundary (for a resize); rank 0 asks after every step.
"""

from __future__ import annotations

import collections

import ray

from autobatch.metrics.prometheus import PrometheusSink
from autobatch.metrics.snapshot import RankSnapshot

PENDING_MAX = 20_000  # snapshots kept for `drain`


@ray.remote(num_cpus=0)
class SnapshotCollector:
    def __init__(self, host: str | None = None, port: int = 0, url: str = "") -> None:
        """`host`: serve /metrics there (port 0: any free port). None: keep the snapshots
        for `drain`, and report `url` (where the owner serves them) as the job's."""
        # Bounded: while nobody drains (a daemon restarting), the oldest are dropped.
        self._pending: collections.deque[RankSnapshot] = collections.deque(maxlen=PENDING_MAX)
        self._latest: dict[int, RankSnapshot] = {}
        self._stop = False
        self._sink = self._server = None
        self._url = url
        if host is not None:
            self._sink = PrometheusSink()
            self._server, port = self._sink.serve(host, port)
            shown = host if host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
            self._url = f"http://{shown}:{port}/metrics"

    def push(self, snapshot: RankSnapshot) -> None:
        self._latest[snapshot.rank] = snapshot
        if self._sink is not None:
            self._sink.push(snapshot)
        else:
            self._pending.append(snapshot)

    def drain(self) -> list[RankSnapshot]:
        out = list(self._pending)
        self._pending.clear()
        return out

    def latest(self) -> list[RankSnapshot]:
        return list(self._latest.values())

    def request_stop(self) -> None:
        """The ranks stop after the step they are in (a checkpoint, then they return)."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def begin_attempt(self) -> None:
        """A new set of ranks starts: no directive, and no snapshot of the old ranks."""
        self._stop = False
        self._latest.clear()

    def url(self) -> str:
        return self._url

    def render(self) -> bytes:
        return self._sink.render() if self._sink is not None else b""
