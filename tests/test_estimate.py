"""Estimates for GPUs we do not have: fake-tensor memory, roofline time, the spec table."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autobatch.errors import PlanError, ProbeError
from autobatch.planning.memory import ModelState, PeakLine
from autobatch.planning.planner import make_plan
from autobatch.probe.devices import DeviceSpecError, cpu_device, parse_devices
from autobatch.probe.estimate import (
    BANDWIDTH_EFFICIENCY,
    GPU_OVERHEAD_BYTES,
    GPU_SPECS,
    KERNEL_LAUNCH_S,
    MATMUL_EFFICIENCY,
    OpCost,
    StepTrace,
    _ops_time,
    estimate_capacities,
    estimate_capacity,
    scale_by_depth,
    trace_step,
)
from autobatch.probe.measure import StepRunner
from autobatch.probe.peak import peak_at
from autobatch.probe.profile import NCCL_RESERVE_BYTES
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import TinyGPTConfig, tiny_gpt_task


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def mlp_task() -> Task:
    data = [(torch.randn(64), i % 10) for i in range(8)]
    return Task(
        build_model=lambda: nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)),
        dataset=data,
        collate=lambda items: (
            torch.stack([x for x, _ in items]),
            torch.tensor([y for _, y in items]),
        ),
        loss_fn=lambda model, b: F.cross_entropy(model(b[0]), b[1], reduction="sum"),
    )


def frozen_mlp_task() -> Task:
    """The MLP with its first layer frozen, as LoRA freezes a base model."""

    def build() -> nn.Module:
        model = mlp_task().build_model()
        model[0].requires_grad_(False)
        return model

    return Task(**{**mlp_task().__dict__, "build_model": build})


TASKS = {
    "mlp": mlp_task,
    "frozen_mlp": frozen_mlp_task,
    "tiny_gpt": lambda: tiny_gpt_task(dataset_size=8),
}


@pytest.fixture(scope="module")
def gpt_trace():
    return trace_step(tiny_gpt_task(dataset_size=8), make_optimizer=adamw)


@pytest.mark.parametrize(
    ("task_name", "traced", "measured"),
    [
        ("mlp", (4, 32, 128), (4, 32, 100, 300)),  # traced sizes, one between, one beyond
        ("frozen_mlp", (4, 32, 128), (4, 32, 100, 300)),
        ("tiny_gpt", (2, 8, 16), (2, 8, 12, 24)),
    ],
)
def test_the_fake_tensor_estimate_matches_the_real_cpu_measurement(task_name, traced, measured):
    task = TASKS[task_name]()
    trace = trace_step(task, make_optimizer=adamw, sizes=traced)
    runner = StepRunner(task, cpu_device(), make_optimizer=adamw)
    runner.run(1)  # the optimizer state exists from here on, as in the trace
    for b in measured:
        real = runner.run(b)
        assert peak_at(trace.peak_lines, b) == pytest.approx(real.peak_bytes, rel=0.01)
        micro = max(line.at(b) for line in trace.peak_lines[:-1])
        assert micro == pytest.approx(real.micro_peak_bytes, rel=0.01)
        assert trace.peak_lines[-1].at(b) == pytest.approx(real.optimizer_peak_bytes, rel=0.01)


def test_training_flops_are_about_six_per_parameter_per_token(gpt_trace):
    cfg = TinyGPTConfig()
    model = tiny_gpt_task(dataset_size=8).build_model()
    matmul_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
    ) + sum(b.attn.in_proj_weight.numel() for b in model.blocks)
    for b, ops in zip(gpt_trace.sizes, gpt_trace.micro_ops):
        flops = sum(op.flops for op in ops)
        six_nt = 6 * matmul_params * b * cfg.seq_len
        assert 1.0 <= flops / six_nt <= 1.3  # plus attention scores, a few percent here


def test_estimate_capacities_for_a_declared_mix(gpt_trace):
    caps = estimate_capacities(
        tiny_gpt_task(dataset_size=8),
        "2xA100-80GB,4xT4-16GB",
        make_optimizer=adamw,
        max_micro_batch=10**6,
    )
    assert [c.name for c in caps] == ["A100-80GB"] * 2 + ["T4-16GB"] * 4
    assert len({c.device_id for c in caps}) == 6 and all(c.estimated for c in caps)
    a100, t4 = caps[0], caps[2]
    assert a100.max_micro_batch > 4 * t4.max_micro_batch  # 80 GB against 15 GB
    assert a100.per_sample_s < t4.per_sample_s  # 2039 GB/s against 320 GB/s
    assert a100.memory_bytes == GPU_SPECS["A100-80GB"].memory_bytes
    # several GPUs: the launcher's NCCL process group, its reserve included
    nccl = estimate_capacity(
        gpt_trace, GPU_SPECS["T4-16GB"], "t4", backend="nccl", max_micro_batch=10**6
    )
    assert t4.max_micro_batch == nccl.max_micro_batch
    plan = make_plan(100_000, caps)
    assert sum(r.samples for r in plan.ranks) == 100_000
    assert "(est)" in plan.render_table()


def test_overhead_reduces_the_largest_micro_batch_by_what_it_takes(gpt_trace):
    t4 = GPU_SPECS["T4-16GB"]
    base = estimate_capacity(gpt_trace, t4, "t4", overhead_bytes=0, max_micro_batch=10**6)
    stated = estimate_capacity(gpt_trace, t4, "t4", max_micro_batch=10**6)
    per_sample = gpt_trace.peak_lines[-2].per_sample_bytes  # the steepest micro-step chord
    lost = base.max_micro_batch - stated.max_micro_batch
    assert lost == pytest.approx(GPU_OVERHEAD_BYTES / per_sample, abs=1)
    gloo = estimate_capacity(gpt_trace, t4, "t4", backend="gloo", max_micro_batch=10**6)
    nccl = estimate_capacity(gpt_trace, t4, "t4", backend="nccl", max_micro_batch=10**6)
    assert nccl.max_micro_batch < gloo.max_micro_batch < stated.max_micro_batch
    assert stated.max_micro_batch - gloo.max_micro_batch == pytest.approx(
        gpt_trace.gradient_bytes / per_sample, abs=1
    )  # DDP's buckets
    assert gloo.max_micro_batch - nccl.max_micro_batch == pytest.approx(
        NCCL_RESERVE_BYTES / per_sample, abs=1
    )


def test_a_gpu_too_small_for_one_sample_is_reported_by_the_planner(gpt_trace):
    l4 = GPU_SPECS["L4-24GB"]
    cap = estimate_capacity(gpt_trace, l4, "l4", overhead_bytes=l4.memory_bytes)
    assert cap.max_micro_batch == 0
    with pytest.raises(PlanError, match=r"cannot fit even one sample"):
        make_plan(8, [cap])


@pytest.mark.parametrize(
    ("devices", "precision", "error", "message"),
    [
        ("2xB200-192GB", "fp32", DeviceSpecError, r"unknown GPU 'B200-192GB'.*known: A10-24GB"),
        ("A100-80GB,T4-16GB", "bf16", ProbeError, r"T4-16GB has no bf16 \(compute capability"),
        ("V100-32GB", "bf16", ProbeError, r"V100-32GB has no bf16"),
        ("A100-80GB", "fp8", ProbeError, r"precision='fp8' must be one of"),
    ],
)
def test_estimate_errors_name_the_device_and_what_is_allowed(devices, precision, error, message):
    with pytest.raises(error, match=message):
        estimate_capacities(
            tiny_gpt_task(dataset_size=8), devices, make_optimizer=adamw, precision=precision
        )


@pytest.mark.parametrize("name", sorted(GPU_SPECS))
def test_the_spec_table_is_consistent(name):
    spec = GPU_SPECS[name]
    assert parse_devices(name, known=GPU_SPECS) == [name]  # every name parses as itself
    assert (spec.bf16_flops is None) == (spec.compute_capability < (8, 0))  # bf16 from Ampere on
    assert spec.fp16_flops > spec.fp32_flops > 0 and spec.bandwidth > 0
    nominal_gb = int(name.split("-")[-1].removesuffix("GB"))
    assert 0.9 * nominal_gb * 2**30 <= spec.memory_bytes <= nominal_gb * 2**30


@pytest.mark.parametrize(
    ("op", "gpu", "seconds"),
    [
        # a matmul: compute-bound; bf16 runs on tensor cores, fp32 does not (TF32 is off)
        (OpCost(1e12, 1e6, torch.bfloat16), "A100-80GB", 1e12 / (312e12 * MATMUL_EFFICIENCY)),
        (OpCost(1e12, 1e6, torch.float32), "A100-80GB", 1e12 / (19.5e12 * MATMUL_EFFICIENCY)),
        (OpCost(1e12, 1e6, torch.float16), "T4-16GB", 1e12 / (65e12 * MATMUL_EFFICIENCY)),
        # an elementwise op: bandwidth-bound
        (OpCost(0.0, 2e9, torch.float32), "T4-16GB", 2e9 / (320e9 * BANDWIDTH_EFFICIENCY)),
    ],
)
def test_each_op_takes_the_slower_of_its_compute_and_its_memory_traffic(op, gpu, seconds):
    assert _ops_time([op], GPU_SPECS[gpu]) == pytest.approx(seconds + KERNEL_LAUNCH_S)


def test_auto_precision_is_bf16_only_where_every_gpu_has_it():
    task = tiny_gpt_task(dataset_size=8)

    def caps(devices: str, precision: str) -> list:
        return estimate_capacities(task, devices, make_optimizer=adamw, precision=precision)

    ampere, mixed = "1xA100-80GB,1xL4-24GB", "1xA100-80GB,1xT4-16GB"
    assert caps(ampere, "auto") == caps(ampere, "bf16")
    with pytest.raises(ProbeError, match="T4"):
        caps(mixed, "bf16")  # a T4 has no bf16: auto must not pick it
    assert caps(mixed, "auto") == caps(mixed, "fp16")


# ---------------------------------------------------------------------------
# the model's state, sharding, and depth


def test_the_trace_counts_the_models_state(gpt_trace):
    model = tiny_gpt_task(dataset_size=8).build_model()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = gpt_trace.state
    assert state.params_bytes == state.grads_bytes == gpt_trace.gradient_bytes == params
    assert state.optimizer_bytes == 2 * params  # AdamW's two moments (its step counters aside)
    assert 0 < state.largest_unit_bytes < params  # one block


def test_an_estimate_carries_a_memory_model_for_sharded_plans(gpt_trace):
    caps = [
        estimate_capacity(gpt_trace, GPU_SPECS[name], f"g{i}", backend="nccl")
        for i, name in enumerate(["A100-80GB", "T4-16GB", "T4-16GB"])
    ]
    for d in caps:  # the fit and its figures agree: one sample fits iff its peak is in budget
        assert (d.max_micro_batch >= 1) == (d.memory.peak_bytes(1) <= d.memory.budget("none"))
    full = make_plan(96, caps, sharding="full")
    assert full.sharding == "full" and sum(r.samples for r in full.ranks) == 96
    replica = caps[1].memory.state.per_rank("none", 3)
    assert max(r.state_bytes for r in full.ranks) < replica  # a third of the state, and a unit


def _trace(fixed: float, per_sample: float, params: int, ops: int) -> StepTrace:
    """A made-up trace: one micro-step line, an optimizer line, `ops` identical matmuls."""
    op = OpCost(1e9, 1e6, torch.float32)
    state = ModelState(params, params, 2 * params, largest_unit_bytes=10, root_unit_bytes=5)
    return StepTrace(
        sizes=(2, 16),
        peak_lines=(PeakLine(fixed, per_sample), PeakLine(fixed + 100, 0.0)),
        micro_ops=((op,) * ops, (op,) * (2 * ops)),
        optimizer_ops=(op,) * ops,
        gradient_bytes=params,
        state=state,
    )


@pytest.mark.parametrize(
    ("depths", "layers", "expected_fixed", "expected_ops"),
    [
        ((1, 2), 1, 1000, 10),  # the shallow trace itself
        ((1, 2), 2, 1500, 14),  # the deep one itself
        ((1, 2), 32, 16500, 134),  # base 500 + 32 x 500 per layer; ops 6 + 32 x 4
        ((2, 4), 6, 2000, 18),  # two periods of two layers each: 1000 + 2 x 500
    ],
)
def test_scale_by_depth_is_base_plus_layers_times_the_per_layer_difference(
    depths, layers, expected_fixed, expected_ops
):
    shallow, deep = _trace(1000, 10, 100, 10), _trace(1500, 14, 140, 14)
    scaled = scale_by_depth(shallow, deep, depths=depths, layers=layers)
    assert scaled.peak_lines[0].fixed_bytes == pytest.approx(expected_fixed)
    a = (layers - depths[0]) / (depths[1] - depths[0])
    assert scaled.peak_lines[0].per_sample_bytes == pytest.approx(10 + 4 * a)
    assert scaled.peak_lines[1].fixed_bytes == pytest.approx(expected_fixed + 100)
    assert scaled.state.params_bytes == round(100 + 40 * a) == scaled.gradient_bytes
    assert scaled.state.largest_unit_bytes == 10 and scaled.state.root_unit_bytes == 5
    a100 = GPU_SPECS["A100-80GB"]
    one_op = _ops_time([OpCost(1e9, 1e6, torch.float32)], a100)
    assert _ops_time(scaled.optimizer_ops, a100) == pytest.approx(expected_ops * one_op)


def test_scale_by_depth_needs_traces_at_the_same_sizes():
    other = replace(_trace(1500, 14, 140, 14), sizes=(4, 16))
    with pytest.raises(ProbeError, match="the same micro-batch sizes"):
        scale_by_depth(_trace(1000, 10, 100, 10), other, depths=(1, 2), layers=32)
    with pytest.raises(ProbeError, match=r"depths=\(2, 1\) must be 1 <= d1 < d2"):
        scale_by_depth(_trace(1000, 10, 100, 10), _trace(1, 1, 1, 1), depths=(2, 1), layers=32)
