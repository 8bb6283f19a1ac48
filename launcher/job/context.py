"""What the controller sends each rank (RankContext) and gets back (RankOutcome), what a run
has been through (RunTally), and the id of a run (`new_run_id`: one per JobController
run, with its attempts numbered from 0)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from autobatch.probe.devices import DeviceInfo
from autobatch.step.precision import Precision
from launcher.job.spec import JobSpec


@dataclass(frozen=True)
class RankContext:
    """Everything one rank needs to train; built by the runner, sent to the actor."""

    job: str
    spec: JobSpec
    precision: Precision  # the spec's, with auto resolved for the devices of the job
    plan_json: str
    rank: int
    device: DeviceInfo
    node: str
    checkpoint_dir: str
    output_dir: str | None
    resume_from: str | None
    attempt: int  # within the run, from 0
    run: str = ""  # the run's id (new_run_id): its ledger lines are told from other runs'
    speed: float = 1.0  # simulated devices: relative to this machine (at most 1)
    backward_factor: float = 3.0
    restarts: int = 0
    replans: dict[str, int] = field(default_factory=dict)
    resizes: dict[str, int] = field(default_factory=dict)  # by reason, as the runner counted
    ranks_on_node: int = 1  # ranks of the job on this rank's node (for the data workers)


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    steps_done: int
    final_plan_json: str
    oom_events: int
    checkpoint: str | None
    parameters: dict[str, torch.Tensor] | None = None  # rank 0 only, for invariance checks
    output: str | None = None  # rank 0: where the task saved the trained model
    stopped: bool = False  # stopped at a step boundary for a resize, not at the end


def new_run_id() -> str:
    """A new run's id: when it began (UTC, to the microsecond, so ids sort as the runs began)
    and a random suffix, e.g. "20261206T101500.123456Z-9f3a"."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(2)}"


@dataclass
class RunTally:
    """What the run has been through, for the ranks' metrics and the summary."""

    attempts: int = 0
    restarts: int = 0  # this run's: what the failure policy counts
    before: int = 0  # the job's restarts before this run (a daemon's re-queues)
    run: str = field(default_factory=new_run_id)  # this run's id, on its ledger lines
    replans: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.before + self.restarts
