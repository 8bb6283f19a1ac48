"""What if: will a causal LM fit a cluster you do not have, and with which levers?

For a Hugging Face causal LM given by its config.json alone (no weights, tokenizer
or data are read; `autobatch.probe.lm_depth`) and a declared device list
("2xA100-80GB,4xL4-24GB"), every combination of the memory levers is estimated
and planned:

    precision      fp32, and bf16 when every GPU has it, else fp16 (autocast)
    LoRA           off, or on with the job's adapter (a default one when it has none)
    checkpointing  gradient (activation) checkpointing off or on
    sharding       none (DDP), optimizer, full (FSDP2; `autobatch.planning.memory`),
                   proportional (planned shares; `autobatch.planning.proportional`, not
                   with fp16)

Each combination says whether one sample fits every device, the largest
micro-batch of each device type, and the samples/s of its plan; or, where it
does not fit, what one sample needs on a rank of that device and what it has
(its budget: memory less the headroom, the stated GPU overhead and the process
group's buffers), the same figures the fit is decided by.

Each (precision, LoRA, checkpointing) is traced once (at two shallow depths,
scaled); fp16 reuses bf16's trace (the same ops on tensors of the same sizes) and
sharding needs no trace (the memory model moves the state). The weights' dtype
is the job's in every row.

The answer's values (`Levers`, `LMJob`, `Outcome`, `WhatIf` and its table) are in
`autobatch.probe.outcomes`. Imports autobatch only (transformers and peft lazily).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch

from autobatch.errors import PlanError
from autobatch.levers import SHARDINGS
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.planner import make_plan
from autobatch.planning.proportional import rank_fit
from autobatch.planning.sharded import choose_sharding
from autobatch.probe.devices import parse_devices
from autobatch.probe.estimate import GPU_SPECS, GpuSpec, StepTrace, estimate_capacity
from autobatch.probe.lm_depth import (
    LMConfig,
    load_lm_config,
    shallow_copies,
    trace_lm,
    with_half_precision,
)
from autobatch.probe.outcomes import DeviceFit, Levers, LMJob, Outcome, WhatIf, size_text
from autobatch.step.precision import Precision, check_supported, choose_precision

__all__ = [  # the what-if's values, importable from here as before
    "DeviceFit",
    "LMJob",
    "Levers",
    "Outcome",
    "WhatIf",
    "capacities",
    "declared_gpus",
    "estimate_lm_capacities",
    "outcome",
    "what_if",
]

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
Key = tuple[Precision, bool, bool]  # (precision, LoRA, checkpointing): one trace each


# ---------------------------------------------------------------------------
# estimating and planning


def declared_gpus(devices: str | Sequence[str]) -> list[GpuSpec]:
    """'2xA100-80GB,4xL4-24GB' -> six GPU specs (a DeviceSpecError names a bad entry)."""
    items = [devices] if isinstance(devices, str) else list(devices)
    return [GPU_SPECS[n] for item in items for n in parse_devices(item, known=GPU_SPECS)]


def what_if(job: LMJob, devices: str | Sequence[str]) -> WhatIf:
    """Every lever combination for `job` on the declared `devices`."""
    gpus = declared_gpus(devices)
    lm = load_lm_config(job.model_dir, job.max_seq_len)
    precisions, notes = _precisions(gpus, _own_precision(job, gpus))
    caps: dict[Key, list[DeviceCapacity]] = {}
    with shallow_copies(lm) as dirs:
        for lora, ckpt in ((False, False), (False, True), (True, False), (True, True)):
            for precision, trace in _traces(lm, dirs, job, precisions, lora, ckpt).items():
                caps[precision, lora, ckpt] = capacities(trace, gpus, job, precision=precision)
    outcomes = tuple(
        outcome(Levers(p, lora, ckpt, s), caps[p, lora, ckpt], job)
        for p in precisions
        for lora in (False, True)
        for ckpt in (False, True)
        for s in SHARDINGS
    )
    own, why = _own_levers(job, gpus, caps)
    notes += why + (_how(lm, job),)
    if len(gpus) == 1:
        notes += ("one device: every sharding mode is a full replica there",)
    names = tuple(g.name for g in gpus)
    return WhatIf(lm.name, names, job.global_batch_size, job.max_seq_len, outcomes, own, notes)


def estimate_lm_capacities(job: LMJob, devices: str | Sequence[str]) -> list[DeviceCapacity]:
    """The job's own combination only: each declared GPU's estimated capacity, for one
    plan (`autobatch plan --dry-run` of a causal-LM job)."""
    gpus = declared_gpus(devices)
    lm = load_lm_config(job.model_dir, job.max_seq_len)
    precision = _own_precision(job, gpus)
    for gpu in gpus:  # fail before the trace, naming the device
        check_supported(gpu, precision)
    with shallow_copies(lm) as dirs:
        trace = _trace(lm, dirs, job, precision, job.own_lora, job.own_gradient_checkpointing)
    return capacities(trace, gpus, job, precision=precision)


def _trace(
    lm: LMConfig, dirs: dict, job: LMJob, precision: Precision, lora: bool, ckpt: bool
) -> StepTrace:
    return trace_lm(
        lm,
        dirs,
        seq_len=job.max_seq_len,
        make_optimizer=job.make_optimizer,
        precision=precision,
        dtype=job.dtype,
        lora=job.lora if lora else None,
        gradient_checkpointing=ckpt,
    )


def _traces(
    lm: LMConfig,
    dirs: dict,
    job: LMJob,
    precisions: Sequence[Precision],
    lora: bool,
    ckpt: bool,
) -> dict[Precision, StepTrace]:
    """One trace per precision: fp32's, and one for bf16 and fp16 together."""
    out = {"fp32": _trace(lm, dirs, job, "fp32", lora, ckpt)}
    half = [p for p in precisions if p != "fp32"]
    if half:
        traced = _trace(lm, dirs, job, half[0], lora, ckpt)
        out.update({p: with_half_precision(traced, _HALF[p]) for p in half})
    return out


def capacities(
    trace: StepTrace, gpus: Sequence[GpuSpec], job: LMJob, *, precision: Precision
) -> list[DeviceCapacity]:
    """Each declared GPU's estimated capacity, as `estimate_capacities` makes them (once
    per GPU type)."""
    backend = "nccl" if len(gpus) > 1 else None  # the launcher's process group for GPUs
    by_name = {
        gpu.name: estimate_capacity(
            trace,
            gpu,
            gpu.name,
            precision=precision,
            headroom_fraction=job.headroom_fraction,
            backend=backend,
        )
        for gpu in gpus
    }
    return [replace(by_name[g.name], device_id=f"est{i}:{g.name}") for i, g in enumerate(gpus)]


def outcome(levers: Levers, caps: Sequence[DeviceCapacity], job: LMJob) -> Outcome:
    """The plan for one combination, or which device types one sample does not fit."""
    mode = levers.sharding
    if mode == "proportional":
        return _proportional_outcome(levers, caps, job)
    at_all = [d.sharded(mode, None if mode == "none" else len(caps)) for d in caps]
    unfit = [d for d in _one_of_each_name(at_all) if d.max_micro_batch < 1]
    if unfit:
        why = "; ".join(f"{d.name}: {_needs(d)}" for d in unfit)
        return Outcome(levers, _fits(at_all), None, f"does not fit: {why}")
    try:
        plan = make_plan(job.global_batch_size, caps, sharding=mode, keep_all=job.keep_all)
    except PlanError as exc:
        return Outcome(levers, _fits(at_all), None, f"no plan: {exc}")
    return Outcome(levers, _fits(plan.inputs), plan)


def _proportional_outcome(levers: Levers, caps: Sequence[DeviceCapacity], job: LMJob) -> Outcome:
    """Under "proportional" a device fits when one sample does beside the gathered units
    with no share of the state (the shares are the joint plan's to choose, not 1/W each);
    the columns are then each type's figures at its planned share."""
    W, B = len(caps), job.global_batch_size
    empty = _proportional_fits(caps, [0] * W, B)
    if levers.precision == "fp16":
        why = "not supported: fp16's loss scaler would check one rank's slice of the gradients"
        return Outcome(levers, empty, None, why)
    unfit = [f for f in empty if f.max_micro_batch < 1]
    if unfit:
        why = "; ".join(f"{f.name}: needs {size_text(f.needs_bytes)}, has "
                        f"{size_text(f.has_bytes)}" for f in unfit)  # fmt: skip
        return Outcome(levers, empty, None, f"does not fit: {why} (with no share of the state)")
    try:
        plan = make_plan(B, caps, sharding="proportional", keep_all=job.keep_all)
    except PlanError as exc:
        return Outcome(levers, empty, None, f"no plan: {exc}")
    by_id = {r.device_id: r.state_slice or 0 for r in plan.ranks}
    planned = [d for d in caps if d.device_id in by_id]
    fits = _proportional_fits(planned, [by_id[d.device_id] for d in planned], B)
    return Outcome(levers, fits, plan)


def _proportional_fits(
    caps: Sequence[DeviceCapacity], slices: Sequence[int], global_batch_size: int
) -> tuple[DeviceFit, ...]:
    """One DeviceFit per device type: of its devices, the one with the smallest largest
    micro-batch at its slice."""
    tightest: dict[str, DeviceFit] = {}
    for d, s in zip(caps, slices, strict=True):
        count = sum(c.name == d.name for c in caps)
        fit = DeviceFit(d.name, count, *rank_fit(d, len(caps), s, global_batch_size))
        if d.name not in tightest or fit.max_micro_batch < tightest[d.name].max_micro_batch:
            tightest[d.name] = fit
    return tuple(tightest.values())


def _fits(caps: Sequence[DeviceCapacity]) -> tuple[DeviceFit, ...]:
    return tuple(
        DeviceFit(
            name=d.name,
            count=sum(c.name == d.name for c in caps),
            max_micro_batch=d.max_micro_batch,
            needs_bytes=d.memory.peak_bytes(1, d.sharding, d.world_size or 1),
            has_bytes=d.memory.budget(d.sharding),
        )
        for d in _one_of_each_name(caps)
    )


def _needs(d: DeviceCapacity) -> str:
    need = d.memory.peak_bytes(1, d.sharding, d.world_size or 1)
    return f"needs {size_text(need)}, has {size_text(d.memory.budget(d.sharding))}"


def _one_of_each_name(caps: Sequence[DeviceCapacity]) -> list[DeviceCapacity]:
    return list({d.name: d for d in reversed(caps)}.values())[::-1]


def _precisions(gpus: Sequence[GpuSpec], own: Precision) -> tuple[list[Precision], tuple[str, ...]]:
    """fp32, and bf16 when every GPU has it, else fp16 (as `precision: auto` picks; fp16
    also when the job asks for it); and a note for what is left out."""
    no_bf16 = [g for g in gpus if not g.bf16_supported]
    if no_bf16:
        g = no_bf16[0]
        cc = ".".join(map(str, g.compute_capability))
        return ["fp32", "fp16"], (f"bf16 left out: {g.name} has no bf16 (compute capability {cc})",)
    if own == "fp16":
        return ["fp32", "bf16", "fp16"], ()
    why = "fp16 left out: every GPU has bf16, which takes the same memory and needs no loss scaler"
    return ["fp32", "bf16"], (why,)


def _own_precision(job: LMJob, gpus: Sequence[GpuSpec]) -> Precision:
    return choose_precision(gpus)[0] if job.own_precision == "auto" else job.own_precision


def _own_levers(
    job: LMJob, gpus: Sequence[GpuSpec], caps: dict[Key, list[DeviceCapacity]]
) -> tuple[Levers | None, tuple[str, ...]]:
    """The job's own combination, "auto" resolved as the launcher resolves it; None (and
    why) when its precision is not in the table."""
    precision = _own_precision(job, gpus)
    key = (precision, job.own_lora, job.own_gradient_checkpointing)
    if key not in caps:
        return None, (f"the spec's own combination (precision {precision}) is not in the table",)
    sharding = job.own_sharding
    if sharding == "auto":  # full when no mode fits: the job would stop there
        sharding = "full"
        with contextlib.suppress(PlanError):
            sharding = choose_sharding(caps[key])[0]
    return Levers(precision, job.own_lora, job.own_gradient_checkpointing, sharding), ()


def _how(lm: LMConfig, job: LMJob) -> str:
    depths = " and ".join(map(str, lm.depths))
    traced = f"traced at {depths} of its {lm.layers} layers and scaled by depth"
    if len(lm.depths) == 1:
        traced = "traced whole"
    lora = job.lora.model_dump(exclude_none=True)
    return (
        f"{lm.name}, weights {job.dtype} in every row, LoRA rows train {lora}; {traced}, on "
        f"fake tensors, with {job.max_seq_len}-token synthetic sequences (no weights, "
        "tokenizer or data read); all figures are estimates"
    )
