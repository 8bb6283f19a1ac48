"""What a running job tells its owner (the CLI's display, the daemon's job watcher).

The runner calls its listener with one of these values, in this order:

    Planned -> MetricsAt -> [Resuming]
        -> (Progress | Rebalanced | Restarting | Planned Resized)* -> Finished

with a `StateChanged` before each state the controller enters (launcher.job.states:
connecting, reserving, probing, planning, starting, training, resizing, restarting,
succeeded, failed, cancelled), naming the state, the reason and the state it left.

An elastic job's resize is a new `Planned` (the plan on the new devices), then
`Resized` once the new ranks finished their first step. `Rebalanced`: the ranks switched
to a new split of the global batch from their measured compute (docs/rebalancing.md),
as their rank 0 reported it after a step.

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
    resizes: dict[str, int] = dataclasses.field(default_factory=dict)
    output: str | None = None  # the trained model, for tasks that save one

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the parameters."""
        out = dataclasses.asdict(self)
        out.pop("parameters", None)
        out["plan"] = self.plan.to_dict()
        return out

    @classmethod
    def of(
        cls,
        job: str,
        outcomes: Sequence[Any],
        *,
        seconds: float,
        global_batch_size: int,
        restarts: int,
        replans: dict[str, int],
        resizes: dict[str, int],
    ) -> JobSummary:
        """The summary of a run from its ranks' outcomes (launcher.job.context.RankOutcome,
        rank 0's first): OOM events are the ranks' in-place retries plus the restarts for
        one."""
        first = outcomes[0]
        return cls(
            job=job,
            steps=first.steps_done,
            seconds=seconds,
            samples_per_s=first.steps_done * global_batch_size / seconds if seconds else 0.0,
            restarts=restarts,
            oom_events=sum(o.oom_events for o in outcomes) + replans.get("oom", 0),
            replans=dict(replans),
            resizes=dict(resizes),
            checkpoint=first.checkpoint,
            plan=Plan.from_json(first.final_plan_json),
            parameters=first.parameters,
            output=first.output,
        )


@dataclass(frozen=True)
class StateChanged:
    state: str  # the state entered, as `launcher.job.states.state_name` names it
    reason: str  # for the user
    previous: str  # the state left


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
class Resized:
    """The job runs on other devices from `step` on, with the same global batch."""

    reason: str  # "grew", "shrank" or "device_lost"
    why: str  # for the user: "grew into freed devices", "shrank for job X", ...
    devices: tuple[int, ...]  # the job's devices now (indices into the spec's devices)
    before: tuple[int, ...]
    step: int  # the first step on the new devices
    seconds: float  # from the request to the new ranks' first step done


def describe_resize(r: Resized) -> str:
    """One line for the user: why, which devices, from which step, at what cost."""
    return (
        f"{r.why}: devices {list(r.before)} -> {list(r.devices)} from step {r.step} "
        f"({r.seconds:.1f} s)"
    )


@dataclass(frozen=True)
class Rebalanced:
    """The ranks train a new split of the same global batch from `step` on."""

    step: int  # the first step on the new split
    before_s: float  # the old split's step, predicted from the measured compute
    after_s: float  # the new split's step, predicted the same way
    ratios: tuple[float, ...]  # per rank: measured / predicted compute over the window
    micro_batches: tuple[tuple[int, ...], ...]  # per rank, the new split

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_rebalance(r: Rebalanced) -> str:
    """One line for the user: from which step, the predicted step before and after, the split."""
    split = ", ".join(f"{sum(mb)} ({len(mb)})" for mb in r.micro_batches)
    return (
        f"rebalanced from step {r.step}: predicted step {r.before_s * 1e3:.1f} -> "
        f"{r.after_s * 1e3:.1f} ms; samples (micro-steps) per rank: {split}"
    )


def rebalances_in(snaps: Sequence[RankSnapshot], seen: set[tuple]) -> list[Rebalanced]:
    """The rebalances rank 0's latest snapshot reports that are not in `seen` (added to it)."""
    rank0 = next((s for s in snaps if s.rank == 0), None)
    new = []
    for r in rank0.rebalances if rank0 is not None else ():
        event = Rebalanced(
            r["step"],
            r["before_s"],
            r["after_s"],
            tuple(r["ratios"]),
            tuple(tuple(mb) for mb in r["micro_batches"]),
        )
        key = (event.step, event.micro_batches)
        if key not in seen:
            seen.add(key)
            new.append(event)
    return new


@dataclass(frozen=True)
class Finished:
    summary: JobSummary


RunnerEvent = Union[  # noqa: UP007
    StateChanged, Planned, MetricsAt, Resuming, Progress, Rebalanced, Restarting, Resized, Finished
]
Listener = Callable[[RunnerEvent], None]
