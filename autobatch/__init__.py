"""autobatch: a fixed global batch on mixed GPUs.

The library is usable in any DDP script and never imports Ray or the launcher.
Names are imported on first use, so that light modules (metrics, plan) load
without torch.

May import: autobatch.errors; never: torch, ray, launcher.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Accumulator": "autobatch.step.accumulate",
    "StepResult": "autobatch.step.accumulate",
    "AutobatchError": "autobatch.errors",
    "LaunchError": "autobatch.errors",
    "PlanError": "autobatch.errors",
    "ProbeError": "autobatch.errors",
    "SamplerError": "autobatch.errors",
    "TokenBudget": "autobatch.planning.packing",
    "pack_global_batch": "autobatch.planning.packing",
    "token_budgets": "autobatch.planning.packing",
    "DeviceCapacity": "autobatch.planning.capacity",
    "MemoryModel": "autobatch.planning.memory",
    "ModelState": "autobatch.planning.memory",
    "PeakLine": "autobatch.planning.memory",
    "SHARDINGS": "autobatch.levers",
    "Sharding": "autobatch.levers",
    "Plan": "autobatch.planning.plan",
    "RankPlan": "autobatch.planning.plan",
    "equal_split_plan": "autobatch.planning.planner",
    "make_plan": "autobatch.planning.planner",
    "GlobalBatchSampler": "autobatch.planning.sampler",
    "plan_for_group": "autobatch.probe.group",
    "SimulatedDevice": "autobatch.probe.devices",
    "Replicated": "autobatch.step.wrap",
    "Sharded": "autobatch.step.shard",
    "wrapping_for": "autobatch.step.wrap",
    "save_sharded": "autobatch.step.dcp",
    "load_sharded": "autobatch.step.dcp",
    "SamplerState": "autobatch.planning.sampler",
    "Task": "autobatch.tasks.task",
    "MicroBatchSampler": "autobatch.tasks.loader",
    "StepBatches": "autobatch.tasks.loader",
    "StepLoader": "autobatch.tasks.loader",
    "default_num_workers": "autobatch.tasks.loader",
    "micro_batch_loader": "autobatch.tasks.loader",
}

__all__ = [
    "Accumulator",
    "AutobatchError",
    "DeviceCapacity",
    "GlobalBatchSampler",
    "LaunchError",
    "MemoryModel",
    "MicroBatchSampler",
    "ModelState",
    "PeakLine",
    "Plan",
    "PlanError",
    "ProbeError",
    "RankPlan",
    "Replicated",
    "SHARDINGS",
    "SamplerError",
    "SamplerState",
    "Sharded",
    "Sharding",
    "SimulatedDevice",
    "StepBatches",
    "StepLoader",
    "StepResult",
    "Task",
    "TokenBudget",
    "default_num_workers",
    "equal_split_plan",
    "load_sharded",
    "make_plan",
    "micro_batch_loader",
    "pack_global_batch",
    "plan_for_group",
    "save_sharded",
    "token_budgets",
    "wrapping_for",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from autobatch.errors import (
        AutobatchError,
        LaunchError,
        PlanError,
        ProbeError,
        SamplerError,
    )
    from autobatch.levers import SHARDINGS, Sharding
    from autobatch.planning.capacity import DeviceCapacity
    from autobatch.planning.memory import MemoryModel, ModelState, PeakLine
    from autobatch.planning.packing import TokenBudget, pack_global_batch, token_budgets
    from autobatch.planning.plan import Plan, RankPlan
    from autobatch.planning.planner import equal_split_plan, make_plan
    from autobatch.planning.sampler import GlobalBatchSampler, SamplerState
    from autobatch.probe.devices import SimulatedDevice
    from autobatch.probe.group import plan_for_group
    from autobatch.step.accumulate import Accumulator, StepResult
    from autobatch.step.dcp import load_sharded, save_sharded
    from autobatch.step.shard import Sharded
    from autobatch.step.wrap import Replicated, wrapping_for
    from autobatch.tasks.loader import (
        MicroBatchSampler,
        StepBatches,
        StepLoader,
        default_num_workers,
        micro_batch_loader,
    )
    from autobatch.tasks.task import Task
