"""The probe on a real NVIDIA GPU, at two memory caps: predicted vs measured, then training.

For each cap (torch.cuda.set_per_process_memory_fraction), it probes a small GPT
(`profile_model`, AdamW(foreach=True), bf16 when the GPU has it) and reports the
budget, the steps, the chosen micro-batch b, the peak predicted for b before b
was measured against the measured one, then trains 20 optimizer steps of 2
micro-batches of b with the library's Accumulator (each micro-batch moved to the
GPU inside the loss function, one at a time, as the probe measures it) and
reports OOMs and the allocator's peak. One step at 1.15 x b shows how close to
the edge b is. It also prints the NVML inventory (UUID matching on real hardware).
Meant to finish well under 5 minutes on one GPU.

    .venv/bin/python benchmarks/gpu_probe_check.py [--caps-gib 3 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
import time

import torch

from autobatch.probe.devices import inventory
from autobatch.probe.measure import to_device
from autobatch.probe.profile import profile_model
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.tiny_gpt import TinyGPTConfig, tiny_gpt_task

CFG = TinyGPTConfig(vocab_size=8192, seq_len=512, d_model=512, n_heads=8, n_layers=6)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def train(task, device: torch.device, b: int, precision: str, steps: int) -> dict:  # noqa: ANN001
    """`steps` optimizer steps of 2 micro-batches of b; the allocator's peaks and OOMs."""
    model = task.build_model().to(device)
    opt = adamw(model)
    acc = Accumulator(model, opt, precision=precision)
    host = [task.probe_batch(b) for _ in range(2)]

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return task.loss_fn(m, to_device(batch, device))  # on the GPU for its micro-step only

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    ooms, ran = 0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        failed = False
        try:
            acc.step(host, loss_fn, global_items=2 * b)
            ran += 1
        except torch.OutOfMemoryError:
            failed = True  # recover outside the handler
        if failed:
            ooms += 1
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    out = {
        "ran": ran,
        "ooms": ooms,
        "peak": torch.cuda.max_memory_allocated(device),
        "reserved": torch.cuda.max_memory_reserved(device),
        "s_per_step": (time.perf_counter() - t0) / max(1, steps),
    }
    del model, opt, acc
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps-gib", type=float, nargs=2, default=(3.0, 10.0))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    devices = inventory()
    for d in devices:
        print(
            f"NVML {d.index}: {d.name} {d.uuid} cc={d.compute_capability} bf16={d.bf16_supported} "
            f"pci={d.pci_bus_id} total={d.total_bytes / 2**30:.1f} GiB -> {d.torch_device}"
        )
    info = next((d for d in devices if d.torch_device == "cuda:0"), None)
    if info is None:  # e.g. a MIG slice: NVML lists the parent GPU under another UUID
        print(
            "warning: no NVML device matched cuda:0 by UUID; using the first one", file=sys.stderr
        )
        info = dataclasses.replace(devices[0], torch_device="cuda:0")
    device = torch.device("cuda:0")
    precision = "bf16" if info.bf16_supported else "fp32"
    task = tiny_gpt_task(dataset_size=64, cfg=CFG)
    total = torch.cuda.get_device_properties(device).total_memory
    print(
        f"model: GPT d={CFG.d_model} layers={CFG.n_layers} seq={CFG.seq_len} "
        f"vocab={CFG.vocab_size}; {precision}; AdamW(foreach=True); torch {torch.__version__}"
    )
    failures = 0
    for cap_gib in args.caps_gib:
        fraction = cap_gib * 2**30 / total
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        t0 = time.perf_counter()
        p = profile_model(task, info, make_optimizer=adamw, precision=precision)
        probe_s = time.perf_counter() - t0
        b = p.max_micro_batch
        m = p.measurement_at(b)
        predicted = m.predicted_peak_bytes
        print(
            f"\ncap {cap_gib:.1f} GiB (fraction {fraction:.3f}): usable "
            f"{p.usable_bytes / 2**30:.2f} GiB, budget {p.budget_bytes / 2**30:.2f} GiB, "
            f"reserve {dict(p.reserve)}"
        )
        for s in p.measurements:
            peak = "OOM" if s.oom else f"{s.peak_bytes / 2**20:.0f} MiB"
            print(
                f"  measured step b={s.micro_batch}: peak {peak}"
                + (
                    f", predicted {s.predicted_peak_bytes / 2**20:.0f} MiB"
                    if s.predicted_peak_bytes
                    else ""
                )
            )
        shown = "-" if predicted is None else f"{predicted / 2**20:.0f} MiB"
        error = "" if predicted is None else f" ({(predicted - m.peak_bytes) / m.peak_bytes:+.2%})"
        print(
            f"  chosen micro-batch {b} after {p.measured_steps} steps in {probe_s:.1f} s; "
            f"peak predicted {shown}, measured {m.peak_bytes / 2**20:.0f} MiB{error}; "
            f"time model {p.fixed_s * 1e3:.2f} ms + {p.per_sample_s * 1e3:.3f} ms/sample"
        )
        r = train(task, device, b, precision, args.steps)
        print(
            f"  {args.steps} steps x 2 micro-batches of {b}: {r['ran']} ran, {r['ooms']} OOM; "
            f"allocated peak {r['peak'] / 2**20:.0f} MiB (profile says "
            f"{p.peak_bytes(b) / 2**20:.0f}), reserved peak {r['reserved'] / 2**20:.0f} MiB "
            f"of {cap_gib * 1024:.0f}; {r['s_per_step'] * 1e3:.1f} ms/step "
            f"(model {(p.step_overhead_s + 2 * (p.fixed_s + p.per_sample_s * b)) * 1e3:.1f})"
        )
        failures += r["ooms"] > 0
        over = math.ceil(1.15 * b)
        r_over = train(task, device, over, precision, 1)
        print(
            f"  1 step at 1.15 x b = {over}: "
            + (
                "OOM"
                if r_over["ooms"]
                else f"ran, reserved peak {r_over['reserved'] / 2**20:.0f} MiB"
            )
        )
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s; "
        + ("no OOM in training" if not failures else f"OOM in training at {failures} cap(s)")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
