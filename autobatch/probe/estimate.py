"""Estimates for GPUs you do not have: peak memory and time per micro-batch, never measured.

For planning ahead (`autobatch plan --dry-run`) from a declared list such as
"2xA100-80GB,4xT4-16GB". Every figure here is an ESTIMATE and is labelled so
(`DeviceCapacity.estimated=True`); a real probe replaces it on the hardware.

    gpus      the GPUs an estimate knows (vendor peaks: `GPU_SPECS`)
    trace     the training step on fake tensors: its peak lines, ops and model state;
              `scale_by_depth` for deep models from two shallow traces
    estimate  (this module) the trace on each declared GPU: budget, micro-batch, times

Memory: peak(b) from the trace (`autobatch.probe.trace`), which also counts the
model's state, so an estimate carries a memory model for sharding
(`autobatch.planning.memory`). What tensors do not show is added as a stated
per-GPU overhead: the CUDA context, cuBLAS/cuDNN workspaces and allocator
fragmentation (`GPU_OVERHEAD_BYTES`), plus what the process group holds when the
job has several devices (DDP's gradient buckets; NCCL's buffers with the "nccl"
backend). CPU autocast lowers slightly different ops than CUDA autocast, so
bf16/fp16 estimates are rougher than fp32 ones.

Time: the traced step, op by op: each op's FLOPs (torch's FLOP counter formulas:
matmuls, convolutions, attention) and the bytes it reads and writes. Per GPU, each
op takes max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) (a roofline)
plus a launch cost; `GPU_SPECS` holds vendor peaks and the achievable fractions
below are stated assumptions. The gradient all-reduce is not modelled.

Depth: a transformer of 32 layers is traced at 1 and 2 layers and scaled
(`autobatch.probe.lm_depth`, `autobatch.probe.whatif`), in seconds instead of minutes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.memory import MemoryModel
from autobatch.probe.budget import Backend, check_backend, comm_reserve
from autobatch.probe.devices import parse_devices
from autobatch.probe.gpus import GPU_SPECS, GpuSpec, MiB
from autobatch.probe.measure import MakeOptimizer
from autobatch.probe.model_profile import DEFAULT_MAX_MICRO_BATCH
from autobatch.probe.peak import largest_under, peak_at
from autobatch.probe.trace import OpCost, StepTrace, scale_by_depth, trace_step
from autobatch.step.precision import Precision, check_supported, choose_precision
from autobatch.tasks.task import Task

__all__ = [  # the trace's and the GPUs' names, importable from here as before
    "BANDWIDTH_EFFICIENCY",
    "GPU_OVERHEAD_BYTES",
    "GPU_SPECS",
    "KERNEL_LAUNCH_S",
    "MATMUL_EFFICIENCY",
    "GpuSpec",
    "OpCost",
    "StepTrace",
    "estimate_capacities",
    "estimate_capacity",
    "scale_by_depth",
    "trace_step",
]

# Stated assumptions, not measurements.
GPU_OVERHEAD_BYTES = 1024 * MiB  # CUDA context (~300-600 MiB with lazy loading) + workspaces
MATMUL_EFFICIENCY = 0.6  # fraction of peak FLOP/s an eager matmul achieves
BANDWIDTH_EFFICIENCY = 0.75  # fraction of peak memory bandwidth an elementwise kernel achieves
KERNEL_LAUNCH_S = 8e-6  # eager PyTorch: dispatch + launch per op


def _ops_time(ops: Sequence[OpCost], gpu: GpuSpec) -> float:
    bw = gpu.bandwidth * BANDWIDTH_EFFICIENCY
    total = 0.0
    for op in ops:
        if op.dtype == torch.bfloat16:
            peak = gpu.bf16_flops or gpu.fp16_flops
        elif op.dtype == torch.float16:
            peak = gpu.fp16_flops
        else:
            peak = gpu.fp32_flops
        cost = max(op.flops / (peak * MATMUL_EFFICIENCY), op.bytes / bw) + KERNEL_LAUNCH_S
        total += op.count * cost
    return total


def estimate_capacity(
    trace: StepTrace,
    gpu: GpuSpec,
    device_id: str,
    *,
    precision: Precision = "fp32",
    headroom_fraction: float = 0.05,
    overhead_bytes: int = GPU_OVERHEAD_BYTES,
    backend: Backend | None = None,
    max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH,
) -> DeviceCapacity:
    """One GPU's estimated capacity for the traced step (max_micro_batch 0: one sample
    does not fit; the planner then says so). `backend`: the process group's, for its
    reserve, as in `profile_model`. With the trace's model state the capacity carries a
    memory model (`DeviceCapacity.memory`): sharded figures for any world size."""
    check_supported(gpu, precision)
    reserve = comm_reserve(check_backend(backend), trace.gradient_bytes)
    budget = math.floor(gpu.memory_bytes * (1 - headroom_fraction)) - overhead_bytes
    budget -= sum(v for _, v in reserve)
    m = largest_under(trace.peak_lines, budget, max_micro_batch)
    b1, b2 = trace.sizes
    t1, t2 = (_ops_time(ops, gpu) for ops in trace.micro_ops)
    per_sample = max(0.0, (t2 - t1) / (b2 - b1))
    fixed = max(0.0, t1 - per_sample * b1)

    top = max(m, 2)  # chord of the (convex) peak over [1, m]: never below it there
    p1 = peak_at(trace.peak_lines, 1)
    per_bytes = math.ceil((peak_at(trace.peak_lines, top) - p1) / (top - 1))
    memory = None
    if trace.state is not None:
        memory = MemoryModel(
            budget_bytes=budget,
            micro_lines=trace.peak_lines[:-1],
            optimizer_line=trace.peak_lines[-1],
            state=trace.state,
            max_micro_batch=m,
            cap=max_micro_batch,
            replica_reserve_bytes=dict(reserve).get("ddp_gradient_buckets", 0),
        )
    return DeviceCapacity(
        device_id=device_id,
        name=gpu.name,
        max_micro_batch=m,
        fixed_s=fixed,
        per_sample_s=per_sample,
        step_overhead_s=_ops_time(trace.optimizer_ops, gpu),
        memory_bytes=gpu.memory_bytes,
        peak_fixed_bytes=p1 - per_bytes,
        peak_per_sample_bytes=per_bytes,
        estimated=True,
        memory=memory,
    )


def estimate_capacities(
    task: Task,
    devices: str | Sequence[str],
    *,
    make_optimizer: MakeOptimizer,
    precision: Precision | Literal["auto"] = "fp32",
    headroom_fraction: float = 0.05,
    overhead_bytes: int = GPU_OVERHEAD_BYTES,
    backend: Backend | Literal["auto"] | None = "auto",
    max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH,
) -> list[DeviceCapacity]:
    """ESTIMATED capacities of declared GPUs, e.g. "2xA100-80GB,4xT4-16GB", for the planner.

    `backend` of the process group, for its reserve: "auto" is "nccl" (as the launcher
    picks for GPUs) when there is more than one device, else None (no DDP).
    """
    items = [devices] if isinstance(devices, str) else list(devices)
    names = [name for item in items for name in parse_devices(item, known=GPU_SPECS)]
    if precision == "auto":
        precision, _ = choose_precision([GPU_SPECS[n] for n in names])
    for name in names:  # fail before the trace, naming the device
        check_supported(GPU_SPECS[name], precision)
    if backend == "auto":
        backend = "nccl" if len(names) > 1 else None
    check_backend(backend)  # fail before the trace on a backend it does not know
    trace = trace_step(task, make_optimizer=make_optimizer, precision=precision)
    return [
        estimate_capacity(
            trace,
            GPU_SPECS[name],
            f"est{i}:{name}",
            precision=precision,
            headroom_fraction=headroom_fraction,
            overhead_bytes=overhead_bytes,
            backend=backend,
            max_micro_batch=max_micro_batch,
        )
        for i, name in enumerate(names)
    ]
