"""What the runner sends each rank (RankContext) and gets back (RankOutcome)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    attempt: int
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
