"""What a running job tells its owner (the CLI's display, the daemon's job watcher).

The runner calls its listener with one of these values, in this order:

    Planned -> MetricsAt -> [Resuming] -> (Progress | Restarting)* -> Finished

A listener must not raise: the runner does not catch its errors. Text in these
values (a rank's error message) is data: print it plainly, never as markup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.plan import Plan
from launcher.job.policy import Decision


@dataclass(frozen=True)
class JobSummary:
    job: str
    steps: int
    seconds: float
    samples_per_s: float
    restarts: int
    oom_events: int
    replans: dict[str, int]
    checkpoint: str | None
    plan: Plan
    parameters: dict | None = None
    output: str | None = None  # the trained model, for tasks that save one

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the parameters."""
        out = dataclasses.asdict(self)
        out.pop("parameters", None)
        out["plan"] = self.plan.to_dict()
        return out


@dataclass(frozen=True)
class Planned:
    plan: Plan
    devices: Sequence[Any]  # the probed devices (launcher.job.cluster.ProbedDevice)


@dataclass(frozen=True)
class MetricsAt:
    url: str  # "" when the ranks report to the owner's own target (the daemon)


@dataclass(frozen=True)
class Resuming:
    checkpoint: str


@dataclass(frozen=True)
class Progress:
    snapshots: Sequence[RankSnapshot]  # the latest of every rank


@dataclass(frozen=True)
class Restarting:
    decision: Decision  # why, and the plan of the next attempt
    restarts: int
    resume: str | None  # the checkpoint the next attempt starts from


@dataclass(frozen=True)
class Finished:
    summary: JobSummary


RunnerEvent = Union[Planned, MetricsAt, Resuming, Progress, Restarting, Finished]  # noqa: UP007
Listener = Callable[[RunnerEvent], None]
