"""The states of one job's controller, as data: each holds only what its phase needs.

    Connecting -> Reserving -> Probing -> Planning -> Starting -> Training -> Succeeded
                                                       ^  ^      |
                                                       |  +------+-> Restarting (the failure
                                                       |         |   policy: restart, re-plan)
                                                       +---------+-> Resizing (an elastic job,
                                                                     at a step boundary)
    any state -> Failed (the policy says so, or a phase cannot go on)
    any state -> Cancelled (the stop event, heard within about a second)

Resizing reserves, probes and plans the new devices itself (the profile cache
answers for known device types): the job is running meanwhile, as far as its
owner can tell. A restart keeps the devices (less a lost node's), so it goes
straight to Starting with the policy's plan.

`DAEMON_STATE` maps every state onto the daemon's job states (the HTTP API's), one
to one: the daemon records what the controller entered, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from autobatch.planning.plan import Plan
from launcher.job.policy import Decision


@dataclass(frozen=True)
class Connecting:
    """Connecting to Ray (or starting an embedded local Ray)."""


@dataclass(frozen=True)
class Reserving:
    devices: tuple[int, ...]  # indices into the spec's devices


@dataclass(frozen=True)
class Probing:
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Planning:
    probed: tuple[Any, ...]  # launcher.job.cluster.ProbedDevice, one per active device


@dataclass(frozen=True)
class Starting:
    plan: Plan
    probed: tuple[Any, ...]
    resume: str | None  # the checkpoint the ranks load, if any


@dataclass(frozen=True)
class Training:
    plan: Plan
    probed: tuple[Any, ...]
    refs: tuple[Any, ...] = field(repr=False)  # each rank's train() call, in rank order


@dataclass(frozen=True)
class Resizing:
    devices: tuple[int, ...]  # where the job goes
    reason: str  # grew | shrank
    why: str
    at: float  # time.monotonic() of the request, for the resize's cost


@dataclass(frozen=True)
class Restarting:
    decision: Decision  # why, and the plan of the next attempt
    probed: tuple[Any, ...]
    resume: str | None  # the checkpoint the next attempt starts from
    before: Plan  # the plan of the attempt that failed


@dataclass(frozen=True)
class Succeeded:
    summary: Any  # launcher.job.events.JobSummary


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Cancelled:
    reason: str


JobState = Union[  # noqa: UP007
    Connecting, Reserving, Probing, Planning, Starting, Training, Resizing, Restarting,
    Succeeded, Failed, Cancelled,
]  # fmt: skip
TERMINAL = (Succeeded, Failed, Cancelled)

DAEMON_STATE: dict[str, str] = {
    "connecting": "probing",
    "reserving": "probing",
    "probing": "probing",
    "planning": "probing",
    "starting": "running",
    "training": "running",
    "resizing": "running",
    "restarting": "restarting",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


def state_name(state: JobState) -> str:
    """The state's name as users see it in events, logs and benchmarks ("probing")."""
    return type(state).__name__.lower()
