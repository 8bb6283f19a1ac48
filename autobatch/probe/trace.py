"""A training step traced on fake tensors: its memory and its ops, device-independent.

The job's training step (a micro-step with the gradients of earlier ones alive, then
the optimizer step, as `profile_model` measures them) runs on FAKE CPU tensors under
`FakeTensorMode`, with `TensorMemory` counting every live storage: the model is
built on `meta` and materialised with `to_empty` inside fake mode, so nothing is
allocated. peak(b) is the max of the micro-step lines and the optimizer line; the
trace also counts the model's state (for sharding). Each op is recorded with its
FLOPs (torch's FLOP counter formulas) and the bytes it reads and writes, for the
per-GPU time in `autobatch.probe.estimate`.

Depth: `scale_by_depth` makes a deep model's trace from traces of two shallow
copies of it (the same layers, fewer of them): per-layer cost = the difference,
total = base + layers x per-layer.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch.errors import AutobatchError, ProbeError
from autobatch.planning.memory import ModelState
from autobatch.probe.measure import MakeOptimizer
from autobatch.probe.model_state import model_state
from autobatch.probe.peak import PeakLine
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.step.precision import Precision
from autobatch.step.shard import BlocksFn, repeated_blocks
from autobatch.tasks.task import Task


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
