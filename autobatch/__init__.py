"""autobatch: a fixed global batch on mixed GPUs.

The library is usable in any DDP script and never imports Ray or the launcher.
"""

from autobatch.accumulate import Accumulator, StepResult
from autobatch.errors import AutobatchError, LaunchError, PlanError, ProbeError, SamplerError
from autobatch.plan import DeviceCapacity, Plan, RankPlan, equal_split_plan, make_plan
from autobatch.sampler import GlobalBatchSampler, SamplerState
from autobatch.task import Task

__all__ = [
    "Accumulator",
    "AutobatchError",
    "DeviceCapacity",
    "GlobalBatchSampler",
    "LaunchError",
    "Plan",
    "PlanError",
    "ProbeError",
    "RankPlan",
    "SamplerError",
    "SamplerState",
    "StepResult",
    "Task",
    "equal_split_plan",
    "make_plan",
]
