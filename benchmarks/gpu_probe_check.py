"""The probe on a real NVIDIA GPU, at two memory caps: predicted vs measured, then training.

    OUT=<dir> bash benchmarks/gpu_run.sh      # this and gpu_check.py, see there
    python3 benchmarks/gpu_probe_check.py [--caps-gib 3 10] [--steps 20] [--time-steps 5]
        [--time-limit S] [--no-write] [--cpu]

Runs from a bare checkout with the machine's python (torch and numpy; the
repository goes on sys.path, see gpu_common.py). For each cap
(torch.cuda.set_per_process_memory_fraction) it probes a small GPT
(`profile_model` in one process: no process-group reserve; AdamW(foreach=True);
bf16 when the GPU has it) and reports the budget, the measured steps, the chosen
micro-batch b, the peak predicted for b before b was measured against the
measured one. Then it trains --steps optimizer steps of 2 micro-batches of b with
the library's Accumulator (each micro-batch moved to the GPU inside the loss
function, one at a time, as the probe measures it; the loss sums every target
token, so `global_items` counts target tokens) and reports OOMs, the allocator's
peaks, and the time per step from the second step on (the first creates the
optimizer state) against the probe's time model. One step at 1.15 x b shows how
close to the edge b is. Then the time model: per micro-batch size the probe measured
(up to b), the fitted line's micro-step time against the median micro-step of
--time-steps training steps at that size (the first not timed; at b, the run above),
warm and synchronised as the probe times them, and at b whether the line is within
`TIME_GOAL` (10%) of the measurement; the profile's line says whether its fit was
trusted. It also prints the NVML inventory (UUID matching on real hardware).

A failure (an exception at one cap, the time limit) is recorded with what was
measured before it, in a FAILED section; the next cap still runs after an
exception. Results are printed and written to $OUT/gpu_probe_check.md and .json
when OUT is set; on a GPU, unless --no-write, also to this check's part of the
GPU section of benchmarks/RESULTS.md. `--cpu` runs the same on simulated devices
of --caps-mib (counted tensor bytes for the allocator's peak, an out-of-memory
at the cap), as a functional check. Meant to finish in 1 minute on one GPU.
"""

from __future__ import annotations

import gpu_common  # first: the repository on sys.path, the environment guarded

# isort: split

import argparse
import dataclasses
import gc
import math
import signal
import statistics
import sys
import time
import traceback
from typing import Any

import torch

from autobatch.probe.devices import DeviceInfo, SimulatedDevice, inventory
from autobatch.probe.measure import to_device
from autobatch.probe.profile import ModelProfile, profile_model
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.losses import IGNORE_INDEX
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import TinyGPTConfig, tiny_gpt_task

CFG = TinyGPTConfig(vocab_size=8192, seq_len=512, d_model=512, n_heads=8, n_layers=6)
CPU_CFG = TinyGPTConfig(seq_len=64)  # the demo's tiny GPT, for --cpu
TITLE = "gpu_probe_check.py: the probe at two memory caps, predicted vs measured"
TIME_GOAL = 0.10  # predicted micro-step time within 10% of measured at the chosen size


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


class _Memory:
    """Peaks over a run: the CUDA allocator's, or counted tensor bytes with an
    out-of-memory at `limit` on the CPU."""

    def __init__(self, device: torch.device, limit: int, model: Any, opt: Any, extra: Any) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0
        self.counter = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.counter = TensorMemory(limit, model=model, optimizer=opt, extra=extra)

    def __enter__(self) -> None:
        if self.counter is not None:
            self.counter.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.counter is not None:
            self.peak = max(self.peak, self.counter.peak_bytes)
            self.counter.__exit__(*exc)

    def result(self) -> tuple[int, int | None]:
        if self.cuda:
            d = self.device
            return torch.cuda.max_memory_allocated(d), torch.cuda.max_memory_reserved(d)
        return self.peak, None


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """What the next-token loss sums over: the labels after the causal shift, less ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train(
    task: Task, device: torch.device, b: int, precision: str, steps: int, limit: int
) -> dict[str, Any]:
    """`steps` optimizer steps of 2 micro-batches of b; the peaks, OOMs and time per step
    from the second step on."""
    model = task.build_model().to(device)
    opt = adamw(model)
    acc = Accumulator(model, opt, precision=precision)
    host = [task.probe_batch(b) for _ in range(2)]
    micro_s: list[float] = []  # the micro-steps' times from the 2nd step on (synchronised)
    n_tokens = sum(target_tokens(mb) for mb in host)  # the loss sums target tokens

    def loss_fn(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return task.loss_fn(m, to_device(batch, device))  # on the GPU for its micro-step only

    _free(device)
    tensors = [t for mb in host for t in mb.values()]
    memory = _Memory(device, limit, model, opt, tensors)
    ooms, ran, t0 = 0, 0, None
    for step in range(steps):
        failed = False
        try:
            with memory:
                result = acc.step(host, loss_fn, global_items=n_tokens)
            ran += 1
            if step:
                micro_s += result.micro_step_s  # each waited for the device (its loss on host)
        except torch.OutOfMemoryError:
            failed = True  # recover outside the handler
        if failed:
            ooms += 1
            opt.zero_grad(set_to_none=True)
            _free(device)
        if step == 0:  # the first step creates the optimizer state: not timed
            _sync(device)
            t0 = time.perf_counter()
    _sync(device)
    peak, reserved = memory.result()
    out = {
        "ran": ran,
        "ooms": ooms,
        "peak": peak,
        "reserved": reserved,
        "s_per_step": (time.perf_counter() - t0) / (steps - 1) if steps > 1 else None,
        "global_items": n_tokens,
        "micro_step_s": statistics.median(micro_s) if micro_s else None,
        "micro_steps_timed": len(micro_s),
    }
    del model, opt, acc, memory, host, tensors
    _free(device)
    return out


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_cap(
    record: gpu_common.Record,
    task: Task,
    device: torch.device,
    target: DeviceInfo | SimulatedDevice,
    cap: int,
    precision: str,
    steps: int,
    time_steps: int,
) -> dict[str, Any]:
    """Probe at `cap`, then train at the chosen micro-batch; report lines as they come."""
    t0 = time.perf_counter()
    p: ModelProfile = profile_model(task, target, make_optimizer=adamw, precision=precision)
    probe_s = time.perf_counter() - t0
    b = p.max_micro_batch
    m = p.measurement_at(b)  # measured: this probe ran (no cache)
    predicted = m.predicted_peak_bytes
    result: dict[str, Any] = {"cap_bytes": cap, "profile": p.to_dict(), "probe_s": probe_s}
    record.note(
        f"- cap {_size(cap)}: usable {_size(p.usable_bytes)}, budget {_size(p.budget_bytes)}, "
        f"reserve {dict(p.reserve) or 'none'}"
    )
    for s in p.measurements:
        peak = "OOM" if s.oom else _mib(s.peak_bytes)
        guess = f", predicted {_mib(s.predicted_peak_bytes)}" if s.predicted_peak_bytes else ""
        record.note(f"  - measured step b={s.micro_batch}: peak {peak}{guess}")
    shown = "-" if predicted is None else _mib(predicted)
    error = "" if predicted is None else f" ({(predicted - m.peak_bytes) / m.peak_bytes:+.2%})"
    record.note(
        f"  - chosen micro-batch {b} after {p.measured_steps} steps in {probe_s:.1f} s; peak "
        f"predicted {shown}, measured {_mib(m.peak_bytes)}{error}; time model "
        f"{p.fixed_s * 1e3:.2f} ms + {p.per_sample_s * 1e3:.3f} ms/sample "
        f"({'trusted' if p.time_trusted else 'NOT trusted: ' + p.time_note})"
    )
    r = train(task, device, b, precision, steps, cap)
    result["train"] = r
    model_s = p.step_overhead_s + 2 * (p.fixed_s + p.per_sample_s * b)
    record.note(
        f"  - {steps} steps x 2 micro-batches of {b} ({r['global_items']} target tokens a "
        f"step): {r['ran']} ran, {r['ooms']} OOM; allocated peak {_mib(r['peak'])} (profile "
        f"says {_mib(p.peak_bytes(b))}), reserved peak {_mib(r['reserved'])} of "
        f"{_mib(cap)}; {r['s_per_step'] * 1e3:.1f} ms/step from the 2nd step "
        f"(model {model_s * 1e3:.1f})"
    )
    if r["ooms"]:
        record.fail(f"cap {_mib(cap)}: {r['ooms']} OOM in {steps} steps at the probe's b={b}")
    result["timing"] = time_per_size(record, task, device, p, precision, cap, r, time_steps)
    over = math.ceil(1.15 * b)
    r_over = train(task, device, over, precision, 1, cap)
    result["train_over"] = r_over
    edge = "OOM" if r_over["ooms"] else f"ran, peak {_mib(r_over['peak'])}"
    if r_over["reserved"] is not None and not r_over["ooms"]:
        edge += f", reserved peak {_mib(r_over['reserved'])}"
    record.note(f"  - 1 step at 1.15 x b = {over}: {edge}")
    return result


def time_per_size(
    record: gpu_common.Record,
    task: Task,
    device: torch.device,
    p: ModelProfile,
    precision: str,
    cap: int,
    at_b: dict[str, Any],
    steps: int,
) -> list[dict[str, Any]]:
    """Per micro-batch size the probe measured (up to its choice b): the time line's
    micro-step against the median micro-step of `steps` training steps at that size (the
    first not timed); at b, the training run's. Warm and synchronised, as the probe times."""
    b = p.max_micro_batch
    sizes = {m.micro_batch for m in p.measurements if not m.oom}
    sizes |= {m.low_micro_batch for m in p.measurements if not m.oom and m.low_micro_batch}
    rows = []
    for size in sorted(x for x in sizes if x <= b) + ([] if b in sizes else [b]):
        measured = at_b if size == b else train(task, device, size, precision, steps, cap)
        if measured["micro_step_s"] is None:
            continue
        predicted = p.fixed_s + p.per_sample_s * size
        rows.append({"b": size, "predicted_s": predicted, "measured_s": measured["micro_step_s"]})
    cells = "; ".join(
        f"b={row['b']}: {row['predicted_s'] * 1e3:.2f} / {row['measured_s'] * 1e3:.2f} ms"
        f" ({row['predicted_s'] / row['measured_s']:.2f}x)"
        for row in rows
    )
    record.note(f"  - micro-step time, predicted / measured (median, warm): {cells}")
    chosen = next((row for row in rows if row["b"] == b), None)
    if chosen is not None:
        off = chosen["predicted_s"] / chosen["measured_s"] - 1
        goal = "within" if abs(off) <= TIME_GOAL else "NOT within"
        record.note(
            f"  - at the chosen b={b}: predicted {chosen['predicted_s'] * 1e3:.2f} ms, measured "
            f"{chosen['measured_s'] * 1e3:.2f} ms ({off:+.1%}): {goal} {TIME_GOAL:.0%} (goal)"
        )
    return rows


def targets(
    args: argparse.Namespace, record: gpu_common.Record
) -> tuple[torch.device, list[tuple[int, Any]], str]:
    """The device, (cap, what to probe) per cap, the precision."""
    if args.cpu:
        caps = [int(c * 2**20) for c in args.caps_mib]
        return (
            torch.device("cpu"),
            [(c, SimulatedDevice(f"sim-{c / 2**20:g}MiB", c)) for c in caps],
            "bf16",
        )
    devices = inventory()
    record.data["nvml"] = [dataclasses.asdict(d) for d in devices]
    for d in devices:
        record.say(
            f"NVML {d.index}: {d.name} {d.uuid} cc={d.compute_capability} "
            f"bf16={d.bf16_supported} pci={d.pci_bus_id} total={d.total_bytes / 2**30:.1f} GiB "
            f"-> {d.torch_device}"
        )
    info = next((d for d in devices if d.torch_device == "cuda:0"), None)
    if info is None:  # no NVML (nvidia-ml-py), or a MIG slice listed under its parent's UUID
        record.say("warning: no NVML device matched cuda:0 by UUID; described by torch alone")
        info = gpu_common.cuda_device_info(0)
    caps = [int(c * 2**30) for c in args.caps_gib]
    return (
        torch.device("cuda:0"),
        [(c, info) for c in caps],
        ("bf16" if info.bf16_supported else "fp32"),
    )


def check(args: argparse.Namespace, record: gpu_common.Record) -> None:
    if not args.cpu and not torch.cuda.is_available():
        record.fail("no CUDA device: this check needs an NVIDIA GPU (or --cpu)")
        return
    device, caps, precision = targets(args, record)
    cfg = CPU_CFG if args.cpu else CFG
    task = tiny_gpt_task(dataset_size=64, cfg=cfg)
    where = "CPU (functional check, --cpu)" if args.cpu else torch.cuda.get_device_name(0)
    record.note(
        f"{where}: GPT d={cfg.d_model} layers={cfg.n_layers} seq={cfg.seq_len} "
        f"vocab={cfg.vocab_size}; {precision}; AdamW(foreach=True); torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    record.data["caps"] = []
    for cap, target in caps:
        if args.time_limit is not None and time.time() - record.t0 > args.time_limit:
            record.fail(f"the time limit was reached (--time-limit) before cap {_mib(cap)}")
            return
        record.say(f"cap {_mib(cap)}: probe and train")
        if device.type == "cuda":
            _free(device)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
        try:
            record.data["caps"].append(
                check_cap(record, task, device, target, cap, precision, args.steps, args.time_steps)
            )
        except Exception as exc:  # record it, and try the next cap
            record.fail(f"cap {_mib(cap)}: {gpu_common.error_line(exc)}")
            record.data.setdefault("tracebacks", []).append(traceback.format_exc()[-4000:])
        record.save(results=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps-gib", type=float, nargs="+", default=[3.0, 10.0])
    parser.add_argument("--steps", type=int, help="training steps per cap (default 20; 6 --cpu)")
    parser.add_argument(
        "--time-steps", type=int, help="training steps per other size timed (default 5; 3 --cpu)"
    )
    parser.add_argument("--time-limit", type=float, help="seconds: no new cap after it")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--cpu", action="store_true", help="functional check without a GPU")
    parser.add_argument("--caps-mib", type=float, nargs="+", default=[8.0, 20.0])
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.cpu else 20)
    args.time_steps = args.time_steps or (3 if args.cpu else 5)
    if args.steps < 2 or args.time_steps < 2:
        parser.error("--steps and --time-steps must be >= 2 (the first is not timed)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = gpu_common.Record("gpu_probe_check", TITLE)
    signal.signal(signal.SIGTERM, gpu_common.raise_time_limit)
    try:
        check(args, record)
    except BaseException as exc:  # the time limit, an interrupt, a failure outside a cap
        record.fail(gpu_common.error_line(exc))
        record.data.setdefault("tracebacks", []).append(traceback.format_exc()[-4000:])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        status = "no OOM in training" if not record.failures else "FAILED (below)"
        record.note(f"- {status}; total {time.time() - record.t0:.0f} s")
        written = record.save(results=not (args.cpu or args.no_write))
        print(f"written: {', '.join(map(str, written)) or 'nothing (no OUT, --cpu)'}")
    return 1 if record.failures else 0


if __name__ == "__main__":
    sys.exit(main())
