"""The daemon's connection to Ray: connect (retrying while it cannot), notice Ray is gone.

    its own head (the default): rayhead.ensure_head(state_dir); a head found dead is
        replaced by a new one, and `lost` says so (the jobs that ran on it are re-queued)
    --address / RAY_ADDRESS: the cluster is someone else's; the daemon waits for it to
        answer, connecting with backoff (1, 2, 4 ... 30 s)

A process connects once. Ray's driver ends its whole process when it finds its raylet
dead, in whichever Ray call finds out, so a process that lost Ray never reconnects: the
daemon hands over to a new process (launcher.daemon.keeper), which connects afresh.

Ray's driver also exits when it cannot reach the cluster's GCS for
`RAY_gcs_rpc_server_reconnect_timeout_s` (60 s by default); the daemon sets it to a year
before connecting, so a cluster that is slow to answer costs a wait, not the process.
`waiting_for` says what the daemon waits for meanwhile (/healthz shows it).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable

import ray

from launcher.daemon import rayhead
from launcher.errors import HeadError, LaunchError

RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
MAX_BACKOFF_S = 30.0
# A head whose process runs but whose GCS does not answer (a busy machine) is lost only
# after this long: replacing a live head would cost every job its run.
UNANSWERED_S = 15.0


class RayLink:
    def __init__(self, state_dir: pathlib.Path, address: str | None, num_cpus: int) -> None:
        self.state_dir, self.num_cpus = state_dir, num_cpus
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.gcs: str | None = None  # the GCS this process is connected to
        self.waiting_for: str | None = None  # what the daemon waits for; None: connected
        self.lost: str | None = None  # at connect: the head the last process used is gone
        self._head_pid: int | None = None
        self._unanswered_since: float | None = None
        self._warned = False  # the head's exposure said

    @property
    def owns_head(self) -> bool:
        return self.address is None

    def connect(self) -> None:
        from launcher.job import cluster

        os.environ.setdefault(RECONNECT_ENV, str(365 * 24 * 3600))
        if self.owns_head:
            before = _recorded_pid(self.state_dir)
            address = rayhead.ensure_head(self.state_dir, self.num_cpus)
            self._head_pid = _recorded_pid(self.state_dir)
            if before is not None and before != self._head_pid:
                self.lost = f"the Ray head (pid {before}) was lost"
            warning = rayhead.exposure_warning(self.state_dir)
            if warning and not self._warned:  # once a process, not at every try
                print(f"autobatch daemon: {warning}", file=sys.stderr, flush=True)
                self._warned = True
        else:
            address = self.address
        cluster.connect(address)
        # Ray builds its serialisation context (importing pydantic.v1) on first use; doing
        # that in two threads at once (a job thread, the API importing FastAPI) raced into
        # KeyError: 'pydantic.v1'. Build it here, before any job thread exists.
        ray.get(ray.put(None))
        self.gcs = ray.get_runtime_context().gcs_address

    def connect_until(self, stopping: Callable[[], bool], wait: threading.Event) -> bool:
        """Connect, retrying with backoff while it fails; False if `stopping` said so first."""
        what = "the Ray head" if self.owns_head else f"the Ray cluster at {self.address}"
        self.waiting_for = f"{what}: connecting" + (" (starting it)" if self.owns_head else "")
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

    def healthy(self) -> bool:
        """The daemon's head runs and answers (or the cluster's GCS answers). A head whose
        process is gone is lost at once; one that does not answer, after UNANSWERED_S."""
        if self.gcs is None:
            return True  # not connected: nothing to lose
        if self.head_gone():
            return False
        if rayhead.answers(self.gcs):
            self._unanswered_since = None
            return True
        since = self._unanswered_since = self._unanswered_since or time.monotonic()
        return time.monotonic() - since < UNANSWERED_S

    def head_gone(self) -> bool:
        """The daemon's own head was connected to and its process no longer runs."""
        return self.owns_head and self.gcs is not None and not rayhead.alive(self._head_pid or -1)

    def lost_what(self) -> str:
        if self.owns_head:
            return f"the Ray head (pid {self._head_pid}) was lost"
        return f"the Ray cluster at {self.address} stopped answering"


def _recorded_pid(state_dir: pathlib.Path) -> int | None:
    try:
        return int(json.loads(rayhead.head_file(state_dir).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
