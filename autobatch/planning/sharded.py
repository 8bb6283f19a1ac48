"""Plans for a sharded model: the ranks included decide each device's memory.

With sharding ("optimizer", "full"; `autobatch.planning.memory`) a rank holds
1/W of the model's state, so a device's largest micro-batch depends on the world
size W, which depends on the devices the plan includes. A plan is made for the
world size it includes:

1. The group: every device that fits one sample when shared over the group's
   size (start from all; drop those that do not fit; repeat: fewer ranks, more
   state each).
2. Candidate groups, one per size W: the W fastest devices among those that fit
   at W (fastest: the shortest step for one sample, `time_of((1,))`; a replica
   planner leaves out exactly the devices slower than that at its optimum).
   Each is planned with every device taking part; the fastest plan wins (on a
   tie, the larger group). A heuristic for the subsets of devices; within a
   group the plan is exact.

"optimizer" plans like a replica (each rank its own number of micro-steps: the
replica solver, `autobatch.planning.solver`). "full" all-gathers in every forward,
so every rank runs the same number of micro-steps (`autobatch.planning.equal_steps`).

"proportional" is planned jointly, slices and micro-batches together
(`autobatch.planning.proportional`).

`choose_sharding` is the "auto" mode: no sharding when a replica fits every device,
else the lightest FSDP2 mode that fits every device; only when none does, "proportional"
if its joint plan fits every device (it holds one block at a time, as `full` does, and
a planned share of the state instead of an even one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from autobatch.errors import PlanError
from autobatch.levers import Sharding, ShardingChoice, check_sharding
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.equal_steps import equal_accumulation_shares
from autobatch.planning.plan import ExcludedDevice, Plan, size_text
from autobatch.planning.proportional import make_proportional_plan
from autobatch.planning.solver import (
    assemble,
    check_inputs,
    equal_split_baseline,
    optimal_samples,
    plan_replicas,
    rank_plan,
)

FSDP_MODES: tuple[Sharding, ...] = ("optimizer", "full")  # what `choose_sharding` tries
WHAT_IS_SHARDED = {
    "optimizer": "optimizer state and reduced gradients sharded",
    "full": "parameters, gradients and optimizer state sharded",
}


def make_sharded_plan(
    global_batch_size: int,
    devices: Sequence[DeviceCapacity],
    sharding: ShardingChoice,
    *,
    baseline: bool = True,
    keep_all: bool = False,
) -> Plan:
    """`make_plan(..., sharding=...)`: the fastest plan for the world size it includes."""
    check_inputs(global_batch_size, devices, each_must_fit=None)
    if sharding == "auto":
        try:
            mode, why = choose_sharding(devices)
        except PlanError as none_fits:
            return _proportional_if_it_fits(global_batch_size, devices, none_fits)
        plan = make_sharded_plan(
            global_batch_size, devices, mode, baseline=baseline, keep_all=keep_all
        )
        return replace(plan, notes=(why, *plan.notes))
    if check_sharding(sharding) == "proportional":
        return make_proportional_plan(global_batch_size, devices, keep_all=keep_all)
    if sharding == "none":
        replicas = [d.sharded("none") for d in devices]
        return plan_replicas(global_batch_size, replicas, baseline=baseline, keep_all=keep_all)
    if keep_all:
        caps = _at(devices, sharding, len(devices))
        _require_fit(caps)
        plan = _plan_group(global_batch_size, caps, sharding, baseline=baseline)
        if plan is None:
            raise PlanError(_infeasible_message(global_batch_size, caps))
        return _with_notes(plan)
    return _best_group(global_batch_size, devices, sharding, baseline=baseline)


def choose_sharding(
    devices: Sequence[DeviceCapacity], world_size: int | None = None
) -> tuple[Sharding, str]:
    """The lightest sharding mode in which one sample fits every device, shared over
    `world_size` ranks (default: all the devices), and why (for the plan's notes).

    "none" when a replica fits every device; else "optimizer", else "full"; a
    PlanError naming the devices that fit under no mode. Devices need a memory
    model (`DeviceCapacity.memory`) unless a replica fits them all.
    """
    if not devices:
        raise PlanError("choose_sharding needs at least one device")
    W = len(devices) if world_size is None else world_size
    replicas = [d.sharded("none") for d in devices]
    if not _unfit(replicas):
        return "none", f"sharding none: a full replica fits every device ({_tightest(replicas)})"
    for mode in FSDP_MODES:
        caps = _at(devices, mode, W)
        if not _unfit(caps):
            return mode, (
                f"sharding {mode} ({WHAT_IS_SHARDED[mode]} over {W} ranks): a replica does not "
                f"fit: {_needs(_unfit(replicas), 'none', W)}; sharded, every device fits "
                f"({_tightest(caps)})"
            )
    raise PlanError(
        f"no sharding mode fits every device over {W} ranks: even fully sharded, "
        f"{_needs(_unfit(caps), 'full', W)}; add devices (more ranks share the state), "
        "lower the sequence length, use bf16/fp16 or gradient checkpointing, or leave "
        "these devices out"
    )


def _proportional_if_it_fits(
    B: int, devices: Sequence[DeviceCapacity], none_fits: PlanError
) -> Plan:
    """For "auto" when no FSDP2 mode fits every device: "proportional" if its joint plan
    keeps every device, else the FSDP2 modes' error."""
    try:
        plan = make_proportional_plan(B, devices, keep_all=True)
    except PlanError:
        raise none_fits from None
    why = (
        f"sharding proportional (planned shares of the flat state per device): {none_fits}; "
        f"with shares {[r.state_slice for r in plan.ranks]} of the trainable elements, every "
        "device fits"
    )
    return replace(plan, notes=(why, *plan.notes))


# ---------------------------------------------------------------------------
# the world size a plan includes


def _at(devices: Sequence[DeviceCapacity], mode: Sharding, W: int) -> list[DeviceCapacity]:
    return [d.sharded(mode, W) for d in devices]


def _unfit(caps: Sequence[DeviceCapacity]) -> list[DeviceCapacity]:
    return [d for d in caps if d.max_micro_batch < 1]


def _require_fit(caps: Sequence[DeviceCapacity]) -> None:
    unfit = _unfit(caps)
    if unfit:
        mode, W = caps[0].sharding, caps[0].world_size
        raise PlanError(f"with sharding {mode} over {W} ranks, {_needs(unfit, mode, W)}")


def _group(devices: Sequence[DeviceCapacity], mode: Sharding) -> list[DeviceCapacity]:
    """The devices that fit one sample when the model is shared over just them."""
    group = list(devices)
    while group:
        fit = [d for d, c in zip(group, _at(group, mode, len(group))) if c.max_micro_batch >= 1]
        if len(fit) == len(group):
            return group
        group = fit
    raise PlanError(
        f"no device fits one sample with sharding {mode}, even over all {len(devices)}: "
        f"{_needs(_at(devices, mode, len(devices)), mode, len(devices))}"
    )


def _best_group(
    B: int, devices: Sequence[DeviceCapacity], mode: Sharding, *, baseline: bool
) -> Plan:
    group = _group(devices, mode)
    by_speed = sorted(group, key=lambda d: d.time_of((1,)))  # stable: ties keep device order
    tried: list[Plan] = []  # largest group first
    for size in range(len(by_speed), 0, -1):
        fits = [d for d in by_speed if d.sharded(mode, size).max_micro_batch >= 1]
        if len(fits) < size:
            continue
        kept = {d.device_id for d in fits[:size]}
        caps = _at([d for d in group if d.device_id in kept], mode, size)
        plan = _plan_group(B, caps, mode, baseline=baseline)
        if plan is not None:
            tried.append(plan)
    if not tried:
        raise PlanError(_infeasible_message(B, _at(group, mode, len(group))))
    best = min(tried, key=lambda p: p.predicted_step_time_s)  # ties: the largest group
    return _with_notes(_with_left_out(best, devices, tried))


def _with_left_out(plan: Plan, devices: Sequence[DeviceCapacity], tried: list[Plan]) -> Plan:
    """The plan, naming each device it leaves out and why; inputs at its world size, and
    the ideal of every device that fits at it (as a replica plan counts the devices it
    leaves out for speed)."""
    mode, W = plan.sharding, plan.world_size
    in_plan = {r.device_id for r in plan.ranks}
    inputs, excluded = _at(devices, mode, W), []
    for d in inputs:
        if d.device_id in in_plan:
            continue
        if d.max_micro_batch < 1:
            reason = f"with sharding {mode} over {W} ranks, {_needs([d], mode, W)}"
        else:
            with_it = [p for p in tried if d.device_id in {r.device_id for r in p.ranks}]
            reason = _slower_reason(plan, with_it)
        excluded.append(ExcludedDevice(d.device_id, d.name, reason))
    ideal = sum(d.best_samples_per_s(plan.global_batch_size) for d in inputs if d.max_micro_batch)
    return replace(plan, excluded=tuple(excluded), inputs=tuple(inputs), ideal_samples_per_s=ideal)


def _slower_reason(plan: Plan, with_it: Sequence[Plan]) -> str:
    if not with_it:
        return "not needed: no plan that includes it is feasible"
    best = min(with_it, key=lambda p: p.predicted_step_time_s)
    return (
        f"the {plan.world_size} other rank(s) finish in {plan.predicted_step_time_s * 1e3:.2f} "
        f"ms; with it ({best.world_size} ranks) the step takes "
        f"{best.predicted_step_time_s * 1e3:.2f} ms"
    )


def _with_notes(plan: Plan) -> Plan:
    if plan.sharding != "full":
        return plan
    note = (
        "full sharding all-gathers every unit in each forward and backward: the predicted "
        "times leave that communication out"
    )
    return replace(plan, notes=(*plan.notes, note))


# ---------------------------------------------------------------------------
# one group: every device takes part


def _plan_group(
    B: int, caps: Sequence[DeviceCapacity], mode: Sharding, *, baseline: bool
) -> Plan | None:
    """The fastest plan in which every device of `caps` takes part (None: none exists)."""
    if len(caps) > B:
        return None
    if mode == "optimizer":
        samples = optimal_samples(B, caps, at_least=1)
        return assemble(B, caps, samples, baseline=baseline, sharding=mode)
    found = equal_accumulation_shares(B, caps)
    if found is None:
        return None
    k, samples = found
    ranks = []
    for i, (d, s) in enumerate(zip(caps, samples)):
        base, extra = divmod(int(s), k)
        mbs = (base + 1,) * extra + (base,) * (k - extra)
        ranks.append(rank_plan(i, d, mbs, d.time_of(mbs)))
    return Plan(
        global_batch_size=B,
        ranks=tuple(ranks),
        predicted_step_time_s=max(r.predicted_time_s for r in ranks),
        ideal_samples_per_s=sum(d.best_samples_per_s(B) for d in caps),
        baseline=equal_split_baseline(B, caps) if baseline else None,
        inputs=tuple(caps),
        sharding=mode,
    )


# ---------------------------------------------------------------------------
# messages


def _needs(caps: Sequence[DeviceCapacity], mode: Sharding, W: int) -> str:
    """'T4 (gpu3) needs 16.1 GiB for one sample, its budget is 15.0 GiB; ...'"""
    parts = []
    for d in caps:
        text = f"{d.name} ({d.device_id})"
        if d.memory is not None:
            need = d.memory.peak_bytes(1, mode, W)
            text += f" needs {size_text(need)} for one sample, its budget is "
            text += size_text(d.memory.budget(mode))
        parts.append(text)
    return "; ".join(parts)


def _tightest(caps: Sequence[DeviceCapacity]) -> str:
    d = min(caps, key=lambda d: d.max_micro_batch)
    return f"the tightest, {d.name} ({d.device_id}), takes micro-batches up to {d.max_micro_batch}"


def _infeasible_message(B: int, caps: Sequence[DeviceCapacity]) -> str:
    mode, W = caps[0].sharding, len(caps)
    if B < W:
        return (
            f"global_batch_size={B} is smaller than the {W} ranks that share the model "
            f"(sharding {mode}): every rank needs at least one sample"
        )
    room = sum(d.max_micro_batch for d in caps)
    return (
        f"no plan for global_batch_size={B} with sharding {mode} over {W} ranks: every "
        f"rank runs the same number of micro-steps k, at least one sample each (k <= "
        f"{B // W}), and the ranks hold at most {room} samples per micro-step"
    )
