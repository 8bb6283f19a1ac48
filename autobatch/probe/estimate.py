"""Estimates for GPUs you do not have: peak memory and time per micro-batch, never measured.

For planning ahead (`autobatch plan --dry-run`) from a declared list such as
"2xA100-80GB,4xT4-16GB". Every figure here is an ESTIMATE and is labelled so
(`DeviceCapacity.estimated=True`); a real probe replaces it on the hardware.

Memory: the job's training step (a micro-step with the gradients of earlier
ones alive, then the optimizer step, as `profile_model` measures them) runs on
FAKE CPU tensors under `FakeTensorMode`, with `TensorMemory` counting every
live storage: the model is built on `meta` and materialised with `to_empty`
inside fake mode, so nothing is allocated. peak(b) is the max of the micro-step
lines and the optimizer line; the trace also counts the model's state, so an
estimate carries a memory model for sharding (`autobatch.planning.memory`).
What tensors do not show is added as a stated per-GPU overhead: the CUDA
context, cuBLAS/cuDNN workspaces and allocator fragmentation
(`GPU_OVERHEAD_BYTES`), plus what the process group holds when the job has
several devices (DDP's gradient buckets; NCCL's buffers with the "nccl"
backend). CPU autocast lowers slightly different ops than CUDA autocast, so
bf16/fp16 estimates are rougher than fp32 ones.

Time: the same fake step, op by op: each op's FLOPs (torch's FLOP counter
formulas: matmuls, convolutions, attention) and the bytes it reads and writes.
Per GPU, each op takes max(FLOPs / achievable FLOP/s, bytes / achievable
bandwidth) (a roofline) plus a launch cost; the tables below hold vendor peaks
and the achievable fractions are stated assumptions. The gradient all-reduce
is not modelled.

Depth: `scale_by_depth` makes a deep model's trace from traces of two shallow
copies of it (the same layers, fewer of them): per-layer cost = the difference,
total = base + layers x per-layer. A transformer of 32 layers is traced at 1 and
2 (`autobatch.probe.whatif`), in seconds instead of minutes.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch.errors import AutobatchError, ProbeError
from autobatch.planning.memory import MemoryModel, ModelState
from autobatch.planning.plan import DeviceCapacity
from autobatch.probe.devices import parse_devices
from autobatch.probe.measure import MakeOptimizer
from autobatch.probe.peak import PeakLine, largest_under, peak_at
from autobatch.probe.profile import (
    DEFAULT_MAX_MICRO_BATCH,
    Backend,
    check_backend,
    comm_reserve,
    model_state,
)
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.step.precision import Precision, check_supported, choose_precision
from autobatch.step.shard import BlocksFn, repeated_blocks
from autobatch.tasks.task import Task

TF, GBs, MiB = 1e12, 1e9, 2**20

# Stated assumptions, not measurements.
GPU_OVERHEAD_BYTES = 1024 * MiB  # CUDA context (~300-600 MiB with lazy loading) + workspaces
MATMUL_EFFICIENCY = 0.6  # fraction of peak FLOP/s an eager matmul achieves
BANDWIDTH_EFFICIENCY = 0.75  # fraction of peak memory bandwidth an elementwise kernel achieves
KERNEL_LAUNCH_S = 8e-6  # eager PyTorch: dispatch + launch per op


@dataclass(frozen=True)
class GpuSpec:
    """Vendor peak figures (dense, no sparsity) of one GPU model."""

    name: str
    memory_bytes: int  # total as nvidia-smi / NVML report it (a little under the nominal size)
    fp32_flops: float  # FP32 (TF32 is off for matmuls by default in PyTorch)
    fp16_flops: float  # FP16 tensor cores, FP32 accumulate
    bf16_flops: float | None  # BF16 tensor cores; None: no bf16
    bandwidth: float  # bytes/s
    compute_capability: tuple[int, int]

    is_cuda = True

    @property
    def bf16_supported(self) -> bool:
        return self.bf16_flops is not None


def _gpu(name, mib, fp32, fp16, bf16, bw, cc):  # noqa: ANN001, ANN202
    return GpuSpec(name, mib * MiB, fp32 * TF, fp16 * TF, bf16 and bf16 * TF, bw * GBs, cc)


GPU_SPECS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        # NVIDIA A100 Tensor Core GPU datasheet (SXM4): 19.5 TF FP32, 312 TF BF16/FP16,
        # 1,555 GB/s (40GB) and 2,039 GB/s (80GB) HBM2e.
        _gpu("A100-40GB", 40960, 19.5, 312, 312, 1555, (8, 0)),
        _gpu("A100-80GB", 81920, 19.5, 312, 312, 2039, (8, 0)),
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 67 TF FP32, 989 TF BF16/FP16 dense
        # (1,979 with sparsity), 3.35 TB/s HBM3.
        _gpu("H100-80GB", 81559, 67, 989, 989, 3350, (9, 0)),
        # NVIDIA L4 datasheet: 30.3 TF FP32, 121 TF BF16/FP16 dense (242 sparse), 300 GB/s.
        _gpu("L4-24GB", 23034, 30.3, 121, 121, 300, (8, 9)),
        # NVIDIA T4 datasheet: 8.1 TF FP32, 65 TF mixed FP16/FP32, 320 GB/s; no bf16.
        _gpu("T4-16GB", 15360, 8.1, 65, None, 320, (7, 5)),
        # NVIDIA V100 datasheet (SXM2): 15.7 TF FP32, 125 TF tensor (FP16), 900 GB/s; no bf16.
        _gpu("V100-16GB", 16160, 15.7, 125, None, 900, (7, 0)),
        _gpu("V100-32GB", 32480, 15.7, 125, None, 900, (7, 0)),
        # NVIDIA A10 datasheet: 31.2 TF FP32, 125 TF BF16/FP16 dense (250 sparse), 600 GB/s.
        _gpu("A10-24GB", 23028, 31.2, 125, 125, 600, (8, 6)),
        # NVIDIA L40S datasheet: 91.6 TF FP32, 362 TF BF16/FP16 dense (733 sparse), 864 GB/s.
        _gpu("L40S-48GB", 46068, 91.6, 362, 362, 864, (8, 9)),
        # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 82.6 TF FP32,
        # 165.2 TF FP16/BF16 tensor with FP32 accumulate (dense), 1,008 GB/s GDDR6X.
        _gpu("RTX4090-24GB", 24564, 82.6, 165.2, 165.2, 1008, (8, 9)),
    )
}


# ---------------------------------------------------------------------------
# the fake step


@dataclass(frozen=True)
class OpCost:
    flops: float
    bytes: float
    dtype: torch.dtype  # of the op's first floating-point input (picks the FLOP/s peak)
    count: float = 1.0  # times it runs (a depth-scaled trace weighs each traced model's ops)


class _OpCosts(TorchDispatchMode):
    """Records FLOPs and bytes moved of every kernel (on fake tensors: nothing runs); views
    and `prim` ops (a tensor's device, asked from Python) launch none and are left out."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.ops: list[OpCost] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.namespace == "prim":
            return out
        tensors = [t for t in _leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        packet = _FLOP_ALIASES.get(func._overloadpacket, func._overloadpacket)
        flops = 0.0
        if packet in self.registry:
            flops = float(self.registry[packet](*args, **kwargs, out_val=out))
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        nbytes = float(sum(t.numel() * t.element_size() for t in tensors))
        self.ops.append(OpCost(flops, nbytes, floats[0] if floats else torch.float32))
        return out


def _leaves(x: object) -> list:
    if isinstance(x, (list, tuple)):
        return [leaf for item in x for leaf in _leaves(item)]
    if isinstance(x, dict):
        return [leaf for item in x.values() for leaf in _leaves(item)]
    return [x]


def _flop_aliases() -> dict:
    """CPU attention kernels: the same FLOPs as the CUDA flash kernels the registry knows."""
    aten, out = torch.ops.aten, {}
    for cpu_name, cuda_name in (
        ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
        (
            "_scaled_dot_product_flash_attention_for_cpu_backward",
            "_scaled_dot_product_flash_attention_backward",
        ),
    ):
        if hasattr(aten, cpu_name) and hasattr(aten, cuda_name):
            out[getattr(aten, cpu_name)] = getattr(aten, cuda_name)
    return out


_FLOP_ALIASES = _flop_aliases()


@dataclass(frozen=True)
class StepTrace:
    """What one training step of a task costs, device-independent (from fake tensors)."""

    sizes: tuple[int, int]  # of the two micro-steps in `micro_ops`
    peak_lines: tuple[PeakLine, ...]  # micro-step chords, then the optimizer step's line
    micro_ops: tuple[tuple[OpCost, ...], tuple[OpCost, ...]]  # one micro-step, at each size
    optimizer_ops: tuple[OpCost, ...]
    gradient_bytes: int
    state: ModelState | None = None  # parameters, gradients, optimizer state, sharding units


def trace_step(
    task: Task,
    *,
    make_optimizer: MakeOptimizer,
    precision: Precision = "fp32",
    sizes: tuple[int, ...] = (8, 64, 512),
    shard_blocks: BlocksFn = repeated_blocks,
) -> StepTrace:
    """Run the training step on fake CPU tensors at a few micro-batch sizes (increasing).

    Fake sizes cost nothing, so they reach far: peak(b) bends upwards at some size
    (the max over the step's moments of linear live bytes), and the chords between
    these sizes catch it; times come from the smallest and the largest. An optimizer
    step on zero gradients first builds the optimizer state, as every later step finds
    it. Each size then runs one micro-step with gradients alive (as every micro-step
    after the first of a step: the peak); one optimizer step follows (its peak does not
    depend on b: the micro-batches are gone by then). `TensorMemory` counts their live
    bytes, `_OpCosts` their ops."""
    if len(sizes) < 2 or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
        raise ProbeError(f"sizes={sizes!r} must be at least two increasing sizes >= 1")
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _meta_model(task)
    micro_pts, micro_ops, update = [], {}, _OpCosts()
    # A garbage collection in the middle of the trace frees fake tensors whose release is
    # itself dispatched, and counted: the same step would cost a few ops more or less.
    with _without_gc(), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        model.train()
        opt = make_optimizer(model)
        step = Accumulator(model, opt, precision=precision, loss_scaling=False)
        _zero_gradients(model)
        step.update()  # builds the optimizer state, as every later step finds it
        memory = TensorMemory(model=model, optimizer=opt)
        for b in sizes:
            micro = _OpCosts() if b in (sizes[0], sizes[-1]) else contextlib.nullcontext()
            _zero_gradients(model)  # a micro-step after the first: gradients alive
            with memory:
                mb = task.probe_batch(b)
                with micro:
                    step.micro_step(mb, task.loss_fn, weight=1 / b)
                del mb
            micro_pts.append((b, memory.peak_bytes))
            micro_ops[b] = tuple(getattr(micro, "ops", ()))
        with memory, update:
            step.update()
        optimizer_peak = memory.peak_bytes
        state = model_state(model, _optimizer_bytes(opt), shard_blocks)
    chords = [PeakLine.through(p, q) for p, q in zip(micro_pts, micro_pts[1:])]
    return StepTrace(
        sizes=(sizes[0], sizes[-1]),
        peak_lines=(*chords, PeakLine(optimizer_peak, 0.0)),
        micro_ops=(micro_ops[sizes[0]], micro_ops[sizes[-1]]),
        optimizer_ops=tuple(update.ops),
        gradient_bytes=state.grads_bytes,
        state=state,
    )


def _meta_model(task: Task) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            return task.build_model()
    except AutobatchError:
        raise
    except Exception as exc:
        raise ProbeError(
            "estimates build the model on the 'meta' device (no memory); this build_model "
            f"failed there: {exc}"
        ) from exc


def _zero_gradients(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer state's bytes on the device (each storage once): step counters (0-dim,
    kept on the host unless capturable) are not counted, as in `meta_model_state`."""
    storages = {
        id(v.untyped_storage()): v.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    }
    return sum(storages.values())


@contextlib.contextmanager
def _without_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------
# depth


def scale_by_depth(
    shallow: StepTrace, deep: StepTrace, *, depths: tuple[int, int], layers: int
) -> StepTrace:
    """The trace of the same model with `layers` identical layers, from its traces at two
    depths (`depths`: the layers of `shallow` and `deep`).

    Every figure is base + layers x per-layer, the per-layer part being the difference
    between the two traces over the difference of their depths: the peak lines' fixed and
    per-sample bytes (a chord is linear in the points it joins, which are taken at the
    same sizes), the model's state, and the time of each op list (its ops counted with
    weights 1 - a and a, a = (layers - d1) / (d2 - d1), since a time is a sum over ops).
    What it leaves out: layers that differ from one another."""
    d1, d2 = depths
    if not 1 <= d1 < d2 or layers < 1:
        raise ProbeError(f"depths={depths!r} must be 1 <= d1 < d2, layers={layers!r} >= 1")
    same = shallow.sizes == deep.sizes and len(shallow.peak_lines) == len(deep.peak_lines)
    if not same:
        raise ProbeError("scale_by_depth needs two traces taken at the same micro-batch sizes")
    a = (layers - d1) / (d2 - d1)

    def mix(x: float, y: float) -> float:
        return x + a * (y - x)

    def ops(x: tuple[OpCost, ...], y: tuple[OpCost, ...]) -> tuple[OpCost, ...]:
        return tuple(replace(op, count=op.count * (1 - a)) for op in x) + tuple(
            replace(op, count=op.count * a) for op in y
        )

    lines = tuple(
        PeakLine(mix(p.fixed_bytes, q.fixed_bytes), mix(p.per_sample_bytes, q.per_sample_bytes))
        for p, q in zip(shallow.peak_lines, deep.peak_lines)
    )
    state = None
    if shallow.state is not None and deep.state is not None:
        state = ModelState(
            params_bytes=round(mix(shallow.state.params_bytes, deep.state.params_bytes)),
            grads_bytes=round(mix(shallow.state.grads_bytes, deep.state.grads_bytes)),
            optimizer_bytes=round(mix(shallow.state.optimizer_bytes, deep.state.optimizer_bytes)),
            largest_unit_bytes=deep.state.largest_unit_bytes,  # one layer: the same at any depth
            root_unit_bytes=deep.state.root_unit_bytes,  # outside the layers: likewise
        )
    return StepTrace(
        sizes=deep.sizes,
        peak_lines=lines,
        micro_ops=(
            ops(shallow.micro_ops[0], deep.micro_ops[0]),
            ops(shallow.micro_ops[1], deep.micro_ops[1]),
        ),
        optimizer_ops=ops(shallow.optimizer_ops, deep.optimizer_ops),
        gradient_bytes=round(mix(shallow.gradient_bytes, deep.gradient_bytes)),
        state=state,
    )


# ---------------------------------------------------------------------------
# per GPU


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
