"""One job's driver, as a detached Ray actor: the job lives as long as it does, not the daemon.

    daemon: launch(job_id, spec) -> JobSupervisor "job-<id>" (detached, on the head)
              thread: JobController(spec).run()  -> events (numbered), outcome
    daemon: poll(ack) every half second -> events after `ack`, the outcome once the run
            ended, the job's snapshot collector
    daemon restarted: find(job_id) -> the same actor; poll(-1) hands over what it missed
    daemon: resize(devices, reason, why) -> the runner moves an elastic job at the next
            step boundary; devices() -> where it runs now (for a daemon re-attaching)

The supervisor keeps the events the daemon has not acknowledged, consecutive
`Progress` events folded into the latest, so a supervisor whose daemon is gone holds
a bounded list. It never ends on its own once the run is over: the daemon reads the
outcome, then kills it (`reap`). Its ranks and collector are its own actors, so they
live as long as it does.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from typing import Any

import ray
from ray.exceptions import RayActorError

from autobatch.errors import AutobatchError
from launcher.daemon.rayhead import NAMESPACE
from launcher.job.events import Progress, RunnerEvent
from launcher.job.spec import JobSpec


@ray.remote(num_cpus=0, max_concurrency=4)
class JobSupervisor:
    def __init__(
        self,
        spec: JobSpec,
        metrics_url: str,
        devices: list[int] | None = None,
        restarts_before: int = 0,
    ) -> None:
        from launcher.job.controller import JobController

        self.spec, self.metrics_url = spec, metrics_url
        self._events: list[tuple[int, RunnerEvent]] = []
        self._seq = 0
        self._outcome: dict[str, Any] | None = None
        self._collector: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._runner = JobController(
            spec, listener=self._record, stop=self._stop, collector_factory=self._make,
            devices=devices, restarts_before=restarts_before,
        )  # fmt: skip
        threading.Thread(target=self._run, name="runner", daemon=True).start()

    def poll(self, ack: int) -> tuple[list[tuple[int, RunnerEvent]], dict | None, Any]:
        """Events after `ack` (those up to it are dropped), the outcome once every event
        was handed over and the run ended, and the collector the ranks push to."""
        with self._lock:
            self._events = [(seq, e) for seq, e in self._events if seq > ack]
            outcome = None if self._events else self._outcome
            return list(self._events), outcome, self._collector

    def cancel(self) -> None:
        self._stop.set()

    def resize(self, devices: list[int], reason: str, why: str) -> None:
        self._runner.request_resize(devices, reason, why)

    def devices(self) -> list[int] | None:
        """The spec's devices the job runs on (None: not known yet, all of them)."""
        return list(self._runner.active) if self._runner.active is not None else None

    # -- inside ------------------------------------------------------------------
    def _run(self) -> None:
        from launcher.errors import JobCancelled

        try:
            summary = self._runner.run()
            done = {"state": "succeeded", "reason": f"{summary.steps} steps in "
                    f"{summary.seconds:.1f} s"}  # fmt: skip
        except JobCancelled:
            done = {"state": "cancelled"}
        except AutobatchError as exc:
            done = {"state": "failed", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug fails the job, with its traceback
            done = {
                "state": "failed",
                "error": f"internal error: {type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        with self._lock:
            self._outcome = done

    def _record(self, event: RunnerEvent) -> None:
        with self._lock:
            if (
                isinstance(event, Progress)
                and self._events
                and isinstance(self._events[-1][1], Progress)
            ):
                self._events.pop()
            self._seq += 1
            self._events.append((self._seq, event))

    def _make(self) -> Any:
        from launcher.job.cluster import on_this_node
        from launcher.job.collector import SnapshotCollector

        self._collector = SnapshotCollector.options(**on_this_node()).remote(url=self.metrics_url)
        return self._collector


def actor_name(job_id: str) -> str:
    return f"job-{job_id}"


def launch(
    job_id: str,
    spec: JobSpec,
    metrics_url: str,
    devices: list[int] | None = None,
    restarts_before: int = 0,
) -> Any:
    """A new supervisor for the job, on the daemon's node, outliving the daemon; `devices`:
    the spec's devices an elastic job starts on (default all); `restarts_before`: the job's
    restarts so far (its re-queues included)."""
    from launcher.job.cluster import on_this_node

    return JobSupervisor.options(
        name=actor_name(job_id), namespace=NAMESPACE, lifetime="detached", **on_this_node()
    ).remote(spec, metrics_url, devices, restarts_before)


def find(job_id: str) -> Any | None:
    """The job's supervisor if it still runs."""
    try:
        sup = ray.get_actor(actor_name(job_id), namespace=NAMESPACE)
        ray.get(sup.poll.remote(-(2**62)), timeout=30)  # alive and answering
    except (ValueError, RayActorError, ray.exceptions.GetTimeoutError):
        return None
    return sup


def reap(sup: Any) -> None:
    with contextlib.suppress(ValueError, RayActorError):
        ray.kill(sup, no_restart=True)
