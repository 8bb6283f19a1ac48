"""The heterogeneity win by simulation: planner predictions for 22 cluster mixes, up to 1,024 GPUs.

    .venv/bin/python benchmarks/bench_simulate.py

No GPU runs here. Each GPU model's capacity for the job is ESTIMATED by
`autobatch.probe.estimate.estimate_capacities` (the training step traced once on fake
tensors; memory from the trace, time from a roofline over the GPU_SPECS table:
vendor peaks x stated efficiencies). The planner then predicts, per mix, the
samples/s of its plan, of the equal split (every GPU at the smallest GPU's
micro-batch, the same accumulation: what a DDP user sets today) and of the ideal
(each GPU alone at its best, summed), with efficiency = plan / ideal and
speedup = plan / equal split, and the time `make_plan` took (median of 3).

Two jobs, fp16 mixed precision (the T4 and V100 have no bf16), AdamW(foreach=True)
as on CUDA: the demo's tiny GPT (seq_len 64; global batch 64 per GPU) and a
GPT-2-small-sized GPT (d_model 768, 12 layers, 12 heads, seq_len 1024, vocab
50,304; global batch 16 sequences per GPU). The estimate does not model the
gradient all-reduce; the plan and the equal split would both pay it once per
optimizer step, the ideal not at all.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from autobatch.planning.plan import DeviceCapacity, Plan
from autobatch.planning.planner import equal_split_plan, make_plan
from autobatch.probe.devices import parse_devices
from autobatch.probe.estimate import GPU_SPECS, estimate_capacities
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import tiny_gpt_task

PRECISION = "fp16"
MIXES = (
    "8xA100-80GB",  # control: one model, nothing to balance
    "16xV100-16GB,16xV100-32GB",  # memory differs, speed does not
    "1xA100-80GB,1xL4-24GB,1xT4-16GB",  # bench_hetero's mix
    "2xA100-80GB,4xT4-16GB",
    "1xH100-80GB,7xT4-16GB",
    "4xA100-80GB,4xL4-24GB",
    "2xA100-40GB,2xA10-24GB,4xT4-16GB",
    "4xRTX4090-24GB,4xA10-24GB",
    "8xL40S-48GB,8xL4-24GB",
    "8xH100-80GB,8xA100-80GB",
    "8xA100-80GB,8xV100-16GB",
    "4xH100-80GB,16xT4-16GB",
    "16xA100-80GB,16xT4-16GB",
    "8xA100-80GB,64xT4-16GB",
    "32xH100-80GB,32xL4-24GB",
    "64xA100-80GB,64xV100-32GB",
    "128xA100-80GB,128xT4-16GB",
    "256xH100-80GB,256xA100-80GB",
    "200xA100-80GB,300xL4-24GB,500xT4-16GB",
    "512xA100-80GB,512xT4-16GB",
    "24xH100-80GB,1000xT4-16GB",
    "256xH100-80GB,256xA100-80GB,256xL4-24GB,256xT4-16GB",
)
JOBS = (
    # (label, tiny_gpt sizes, global batch per GPU)
    ("tiny GPT (demo, seq 64)", {"seq_len": 64}, 64),
    (
        "GPT d768 x 12 layers, seq 1024 (GPT-2 small size)",
        {"seq_len": 1024, "d_model": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 50304},
        16,
    ),
)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)


def capacities_by_name(task: Task) -> tuple[dict[str, DeviceCapacity], float]:
    """One estimate per GPU model (one trace of the step), and the seconds it took."""
    names = sorted({n for mix in MIXES for n in parse_devices(mix, known=GPU_SPECS)})
    t0 = time.perf_counter()
    caps = estimate_capacities(
        task, ",".join(names), make_optimizer=adamw, precision=PRECISION, backend="nccl"
    )
    return {c.name: c for c in caps}, time.perf_counter() - t0


def fleet(mix: str, caps: dict[str, DeviceCapacity]) -> list[DeviceCapacity]:
    names = parse_devices(mix, known=GPU_SPECS)
    return [replace(caps[n], device_id=f"{n}#{i}") for i, n in enumerate(names)]


def timed_plan(B: int, devices: list[DeviceCapacity]) -> tuple[Plan, float]:
    times, plan = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        plan = make_plan(B, devices)
        times.append(time.perf_counter() - t0)
    assert plan is not None
    return plan, statistics.median(times)


def busy_share(plan: Plan) -> float:
    """Mean over ranks of the predicted share of the step a rank computes (1 - its wait)."""
    return statistics.fmean(r.predicted_time_s for r in plan.ranks) / plan.predicted_step_time_s


def describe(caps: dict[str, DeviceCapacity]) -> list[str]:
    return [
        f"  {c.name:<13} max micro-batch {c.max_micro_batch:>5}  micro-step "
        f"{c.fixed_s * 1e3:6.2f} ms + {c.per_sample_s * 1e3:8.4f} ms/sample  "
        f"optimizer {c.step_overhead_s * 1e3:6.2f} ms"
        for c in caps.values()
    ]


HEADER = (
    f"{'mix':<54} {'GPUs':>5} {'B':>7} {'plan/s':>9} {'equal/s':>9} {'ideal/s':>9} "
    f"{'eff.':>6} {'speedup':>7} {'busy':>11} {'left out':>8} {'plan ms':>8}"
)


def row(mix: str, n: int, B: int, plan: Plan, equal: Plan, seconds: float) -> str:
    assert plan.baseline is not None
    busy = f"{busy_share(plan):.2f} / {busy_share(equal):.2f}"
    return (
        f"{mix:<54} {n:>5} {B:>7} {plan.predicted_samples_per_s:>9.1f} "
        f"{plan.baseline.samples_per_s:>9.1f} {plan.ideal_samples_per_s:>9.1f} "
        f"{plan.efficiency:>6.3f} {plan.speedup_vs_baseline:>6.2f}x {busy:>11} "
        f"{len(plan.excluded):>8} "
        f"{seconds * 1e3:>8.1f}"
    )


def run_job(label: str, sizes: dict, per_gpu: int) -> None:
    caps, trace_s = capacities_by_name(tiny_gpt_task(dataset_size=64, **sizes))
    print(f"\n{label}: {PRECISION}, global batch {per_gpu} per GPU; estimates in {trace_s:.1f} s")
    print("\n".join(describe(caps)))
    print(HEADER)
    effs, speedups = [], []
    for mix in MIXES:
        devices = fleet(mix, caps)
        B = per_gpu * len(devices)
        plan, seconds = timed_plan(B, devices)
        effs.append(plan.efficiency)
        speedups.append(plan.speedup_vs_baseline)
        print(row(mix, len(devices), B, plan, equal_split_plan(B, devices), seconds))
    print(
        f"efficiency min {min(effs):.3f} median {statistics.median(effs):.3f}; "
        f"speedup over the equal split min {min(speedups):.2f}x "
        f"median {statistics.median(speedups):.2f}x max {max(speedups):.2f}x"
    )


LEGEND = (
    "columns: plan/s, equal/s, ideal/s: predicted samples/s of the plan, the equal split and "
    "the ideal; eff.: plan / ideal; speedup: plan / equal split; busy: mean share of the step "
    "a GPU computes, plan / equal split (1 - idle at the all-reduce); left out: GPUs the plan "
    "does not use; plan ms: make_plan's time, median of 3"
)


def main() -> None:
    torch.set_num_threads(1)
    print(LEGEND)
    for label, sizes, per_gpu in JOBS:
        run_job(label, sizes, per_gpu)


if __name__ == "__main__":
    main()
