"""The daemon's connection to Ray, kept: connect, notice the cluster is gone, connect again.

    its own head (the default): rayhead.ensure_head(state_dir); a head found dead is
        replaced by a new one (jobs that ran on it go back to the queue first)
    --address / RAY_ADDRESS: the cluster is someone else's; the daemon waits for it to
        answer again, connecting with backoff (1, 2, 4 ... 30 s)

Ray's driver exits its whole process when it cannot reach the cluster's GCS for
`RAY_gcs_rpc_server_reconnect_timeout_s` (60 s by default): the daemon would go with its
head. The daemon sets it to a year before connecting, so a lost head costs its jobs a
restart from their checkpoints, and the API keeps answering; `waiting_for` says what
the daemon waits for meanwhile (/healthz shows it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from collections.abc import Callable

import ray

from launcher.daemon import rayhead
from launcher.errors import HeadError, LaunchError

RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
MAX_BACKOFF_S = 30.0


class RayLink:
    def __init__(self, state_dir: pathlib.Path, address: str | None, num_cpus: int) -> None:
        self.state_dir, self.num_cpus = state_dir, num_cpus
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.gcs: str | None = None  # the GCS this process is connected to
        self.waiting_for: str | None = None  # what the daemon waits for; None: connected

    @property
    def owns_head(self) -> bool:
        return self.address is None

    def connect(self) -> None:
        from launcher.job import cluster

        os.environ.setdefault(RECONNECT_ENV, str(365 * 24 * 3600))
        cluster.connect(self.address or rayhead.ensure_head(self.state_dir, self.num_cpus))
        # Ray builds its serialisation context (importing pydantic.v1) on first use; doing
        # that in two threads at once (a job thread, the API importing FastAPI) raced into
        # KeyError: 'pydantic.v1'. Build it here, before any job thread exists.
        ray.get(ray.put(None))
        self.gcs = ray.get_runtime_context().gcs_address

    def healthy(self) -> bool:
        """The daemon's head runs and answers (or the cluster's GCS answers)."""
        if self.owns_head:
            return rayhead.running_head(self.state_dir) is not None
        return self.gcs is None or rayhead.answers(self.gcs)

    def reconnect(self, stopping: Callable[[], bool], wait: threading.Event) -> bool:
        """Disconnect, then connect until it works (a new head if the daemon owns it);
        False if `stopping` said so first."""
        what = "a new Ray head" if self.owns_head else f"the Ray cluster at {self.address}"
        self.waiting_for = f"{what}: the Ray head was lost, connecting again"
        with contextlib.suppress(Exception):  # the old connection is gone anyway
            ray.shutdown()
        delay = 1.0
        while not stopping():
            try:
                self.connect()
                self.waiting_for = None
                return True
            except (HeadError, LaunchError) as exc:
                first = str(exc).splitlines()[0]
                self.waiting_for = f"{what} ({first}); trying again in {delay:.0f} s"
            wait.wait(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
        return False
