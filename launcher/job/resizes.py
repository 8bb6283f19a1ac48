"""An elastic job's resizes: the request (from another thread), and its announcement.

A resize is asked for at any time (`request`); the ranks stop at the next step
boundary with a checkpoint of that step, and the controller takes the request
(`take`) into its Resizing state. A resize (or a lost device, announced like one)
is counted at once and announced (`Resized`) once the new ranks took a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from launcher.errors import LaunchError
from launcher.job.events import Resized
from launcher.job.spec import JobSpec
from launcher.job.states import Resizing


@dataclass(frozen=True)
class _Announce:
    state: Resizing
    before: tuple[int, ...]
    step: int  # the first step on the new devices


class Resizes:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # by reason, for the ranks' metrics
        self._asked: Resizing | None = None
        self._announce: _Announce | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        return self._asked is not None

    def request(self, devices: tuple[int, ...], reason: str, why: str) -> None:
        with self._lock:
            self._asked = Resizing(devices, reason, why, time.monotonic())

    def take(self, active: Sequence[int]) -> Resizing:
        """The request the ranks stopped for (none: resume where they are)."""
        with self._lock:
            asked, self._asked = self._asked, None
        return asked or Resizing(tuple(active), "shrank", "stopped", time.monotonic())

    def count(self, state: Resizing, before: Sequence[int], step: int) -> None:
        """A resize done from `before`, resuming at `step`: counted now, announced later."""
        self.counts[state.reason] = self.counts.get(state.reason, 0) + 1
        self._announce = _Announce(state, tuple(before), step)

    def announcement(self, active: Sequence[int]) -> Resized | None:
        """The resize to announce now that the new ranks took a step (once)."""
        a, self._announce = self._announce, None
        if a is None:
            return None
        s = a.state
        seconds = time.monotonic() - s.at
        return Resized(s.reason, s.why, tuple(active), a.before, a.step, seconds)


def check_devices(
    spec: JobSpec, devices: Sequence[int], requests: Sequence[object] | None = None
) -> None:
    """Raise LaunchError unless `devices` are distinct indices of the spec's devices, as
    many as the job may run on (all of them unless elastic: at least min_count)."""
    n = len(requests) if requests else None
    bad = [i for i in devices if i < 0 or (n is not None and i >= n)]
    if bad or len(set(devices)) != len(devices) or not devices:
        allowed = f"0..{n - 1}" if n else "indices of the spec's devices"
        raise LaunchError(f"devices={list(devices)}: give distinct device indices in {allowed}")
    floor = spec.devices.min_count if spec.devices.elastic else n
    if floor is not None and len(devices) < floor:
        what = f"devices.min_count={floor}" if spec.devices.elastic else "the job is not elastic"
        raise LaunchError(f"devices={list(devices)}: {len(devices)} device(s), {what}")
