"""Probe and plan inside a process group you already have (torchrun, Lightning, Accelerate).

    plan = plan_for_group(task, 128, make_optimizer=lambda m: AdamW(m.parameters()))

Every rank measures its own device for the task (the probe, cached on disk),
the ranks gather their capacities, and each computes the same plan from the
same inputs (a pure function): rank r of the plan is rank r of the group. A
running group cannot shrink, so a rank the planner would leave out (too slow to
help, or not even one sample fits) is an error that names it; `keep_all=True`
keeps every rank that fits.

Which device a rank measures: `AUTOBATCH_SIMULATED_DEVICES` ("name:memory[:speed]"
items, one per rank in rank order, e.g. "sim-a100:24MiB,sim-t4:6MiB:0.25") makes
rank r the r-th simulated device, for CPU-only machines; else the current CUDA
device (`torch.cuda.set_device(local_rank)` first); else the CPU.
"""

from __future__ import annotations

import gc
import os
from typing import Literal

import torch
import torch.distributed as dist

from autobatch.errors import DeviceSpecError, NoFitError, PlanError, ProbeError
from autobatch.levers import Sharding
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.plan import Plan
from autobatch.planning.planner import make_plan
from autobatch.probe.cache import default_cache_dir
from autobatch.probe.devices import (
    DeviceInfo,
    SimulatedDevice,
    cpu_device,
    inventory,
    parse_simulated,
)
from autobatch.probe.measure import MakeOptimizer
from autobatch.probe.model_profile import search_cap
from autobatch.probe.profile import profile_model
from autobatch.step.precision import Precision
from autobatch.tasks.task import Task

SIMULATED_ENV = "AUTOBATCH_SIMULATED_DEVICES"


def plan_for_group(
    task: Task,
    global_batch_size: int,
    *,
    make_optimizer: MakeOptimizer,
    precision: Precision = "fp32",
    headroom_fraction: float = 0.05,
    keep_all: bool = False,
    cache_dir: str | None = None,
    group: dist.ProcessGroup | None = None,
    sharding: Sharding | Literal["auto"] = "none",
) -> Plan:
    """The plan for this process group (one process without one), the same on every rank.

    Call it on every rank, after `init_process_group` and before wrapping the model.
    Where the plan turned gradient checkpointing on for a rank's device
    (`plan.capacity(rank).gradient_checkpointing`), that rank's model needs it too.
    `sharding` ("none", "optimizer", "full", or "auto": the lightest that fits every
    rank): wrap the model with `wrapping_for(plan.sharding)`.
    """
    rank, world = _rank_and_world(group)
    device = this_device(rank, world)
    try:
        profile = profile_model(
            task,
            device,
            make_optimizer=make_optimizer,
            precision=precision,
            headroom_fraction=headroom_fraction,
            backend=dist.get_backend(group) if world > 1 else None,
            max_micro_batch=search_cap(global_batch_size),
            cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
            gradient_checkpointing=None,  # on where micro-batch 1 does not fit without it
        )
        mine: DeviceCapacity | str = profile.capacity(f"rank{rank}", device.name)
    except NoFitError as exc:  # every rank must hear of it, or its peers wait in the gather
        mine = f"rank {rank}: {exc}"
    if isinstance(mine, str):
        gc.collect()  # the failed probe's tensors, held by its traceback's frames
    found: list[DeviceCapacity | str | None] = [mine]
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, mine, group=group)
    no_fit = [f for f in found if isinstance(f, str)]
    if no_fit:
        raise PlanError(
            f"not even one sample fits on {len(no_fit)} of {world} rank(s): {'; '.join(no_fit)}; "
            "a running process group cannot shrink: start it without them"
        )
    capacities = [f for f in found if isinstance(f, DeviceCapacity)]
    plan = make_plan(global_batch_size, capacities, keep_all=keep_all, sharding=sharding)
    if plan.world_size != world:
        left_out = "; ".join(f"{e.device_id} ({e.device_name}): {e.reason}" for e in plan.excluded)
        raise PlanError(
            f"the plan leaves out {world - plan.world_size} of {world} rank(s): {left_out}; a "
            "running process group cannot shrink: start it without them, or pass keep_all=True"
        )
    return plan


def this_device(rank: int, world: int) -> DeviceInfo | SimulatedDevice:
    """The device rank `rank` trains on (see the module docstring)."""
    declared = os.environ.get(SIMULATED_ENV, "").strip()
    if declared:
        sims = parse_simulated(declared)
        if len(sims) != world:
            raise DeviceSpecError(
                f"{SIMULATED_ENV} lists {len(sims)} device(s) for a process group of {world} "
                "rank(s): give one per rank, in rank order"
            )
        return sims[rank]
    if torch.cuda.is_available():
        mine = f"cuda:{torch.cuda.current_device()}"
        found = [d for d in inventory() if d.torch_device == mine]
        if not found:
            raise ProbeError(f"rank {rank}: {mine} is not among this node's devices")
        return found[0]
    return cpu_device()


def _rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
