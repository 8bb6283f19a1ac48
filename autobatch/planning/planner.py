"""The planner: split a fixed global batch over heterogeneous devices.

A pure function of values. Each device brings what it can do for this job (a
`DeviceCapacity`: its largest micro-batch, a linear time model per micro-step, and
optionally its memory model); `make_plan` returns a `Plan` in which every rank has
its exact list of micro-batch sizes, the sizes sum to the global batch, and the
slowest rank's predicted step time is as small as it can be.

`make_plan` is the one entry point, whatever the sharding:

    "none"                replicas: the replica solver (autobatch.planning.solver)
    "optimizer", "full"   a device's memory depends on how many ranks share the model:
                          autobatch.planning.sharded plans for the world size it includes
    "proportional"        slices of the flat state and micro-batches planned jointly
                          (autobatch.planning.proportional, via planning.sharded)
    "auto"                the lightest mode that fits every device (choose_sharding)

`equal_split_plan` is today's DDP recipe, as a runnable plan. A device whose time model
the probe did not trust (`DeviceCapacity.time_note`) is named in the plan's notes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from autobatch.levers import ShardingChoice, check_sharding
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.plan import Plan
from autobatch.planning.sharded import make_sharded_plan
from autobatch.planning.solver import equal_split_plan as equal_split_plan
from autobatch.planning.solver import plan_replicas
from autobatch.planning.solver import split_evenly as split_evenly


def make_plan(
    global_batch_size: int,
    devices: Sequence[DeviceCapacity],
    *,
    baseline: bool = True,
    keep_all: bool = False,
    sharding: ShardingChoice = "none",
) -> Plan:
    """The plan that minimises the slowest rank's predicted step time.

    Ranks follow the order of `devices` (left-out devices are skipped). A
    device is left out only when the others finish the step no later without
    it; the reason is recorded in `Plan.excluded`. With `keep_all` (a running
    process group cannot shrink) every device gets at least one sample: one
    each, and the rest planned as above.

    A device where not even one sample fits is left out with that reason (with
    `keep_all`, or when no device fits, it is a PlanError).

    `sharding` ("none", "optimizer", "full", or "auto": the lightest that fits
    every device, see `choose_sharding`) re-derives each device's memory figures
    for the mode and the world size the plan includes (devices need a memory
    model, `DeviceCapacity.memory`); "full" gives every rank the same number of
    micro-steps. See `autobatch.planning.sharded`.
    """
    if sharding == "auto" or check_sharding(sharding) != "none" or _sharded_inputs(devices):
        plan = make_sharded_plan(
            global_batch_size, devices, sharding, baseline=baseline, keep_all=keep_all
        )
    else:
        plan = plan_replicas(global_batch_size, devices, baseline=baseline, keep_all=keep_all)
    return _with_time_notes(plan, devices)


def _with_time_notes(plan: Plan, devices: Sequence[DeviceCapacity]) -> Plan:
    """A note per device whose time model is not trusted (`DeviceCapacity.time_note`)."""
    notes = [
        f"{d.name} ({d.device_id}): time model not trusted: {d.time_note}; its share of the "
        "batch may be off until the ranks' measured compute rebalances the plan"
        for d in devices
        if d.time_note
    ]
    new = [n for n in notes if n not in plan.notes]
    return replace(plan, notes=(*plan.notes, *new)) if new else plan


def _sharded_inputs(devices: Sequence[DeviceCapacity]) -> bool:
    """Capacities made for a sharding mode: a replica plan re-derives them first."""
    return any(d.sharding != "none" for d in devices)
