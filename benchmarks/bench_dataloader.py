"""Micro-batches collated inline vs by DataLoader workers, for samples that cost CPU to load.

    .venv/bin/python benchmarks/bench_dataloader.py [--steps 16] [--repeats 5] [--decode-ms 3]

A task whose samples must be "decoded" (sample i: a buffer hashed over and over,
calibrated to --decode-ms ms of CPU per sample, then turned into a feature
vector: the stand-in for image decoding and augmentation, or tokenising on the
fly) trains a small MLP (one torch thread, as a launcher rank runs) with a
global batch of --global-batch samples in micro-batches of --micro-batch, on
the library's real path: `StepLoader` (autobatch.tasks.loader) feeding
`Accumulator.step`. Each configuration runs --steps optimizer steps, loader
start-up included; the configurations are interleaved, each repeated
--repeats times, and the median samples/s is printed with its ratio to inline.

  inline     num_workers=0: every micro-batch collated on the training thread
  workers=k  k DataLoader worker processes, 2 micro-batches prefetched each

A second table does the same with a decode that waits instead of computing
(time.sleep: loading from slow storage or a remote store), which the workers
overlap without needing a core. On this 2-core machine the CPU-bound gain is
capped: the training thread and the workers share two cores, so the best case is
(decode + train) / max(train, (decode + train) / 2) per sample, under 2x.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
import warnings

import torch

from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.loader import StepLoader
from autobatch.tasks.task import Task

FEATURES, HIDDEN = 256, 4096


class DecodedDataset:
    """Sample i costs `rounds` hashes of a 4 KiB buffer (CPU) or `sleep_s` (waiting)."""

    def __init__(self, size: int, rounds: int, sleep_s: float) -> None:
        self.size, self.rounds, self.sleep_s = size, rounds, sleep_s

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        digest = _hash_rounds(i.to_bytes(8, "little") * 512, self.rounds)
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        x = torch.randn(FEATURES, generator=g)
        return x, x.roll(1) * 0.5


def _hash_rounds(buf: bytes, rounds: int) -> bytes:
    digest = b""
    for _ in range(rounds):
        digest = hashlib.sha256(buf + digest).digest()
    return digest


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    xs, ys = zip(*samples)
    return torch.stack(xs), torch.stack(ys)


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, FEATURES)
    )


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum()


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and its reaped
    children), for the share other processes took during the run."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    return (sum(fields) - fields[3] - fields[4]) / hz, ours  # minus idle and iowait


def calibrate_rounds(ms: float) -> int:
    """Hash rounds that take `ms` milliseconds of CPU on this machine."""
    buf, n = b"\0" * 4096, 2000
    t0 = time.perf_counter()
    _hash_rounds(buf, n)
    per_round = (time.perf_counter() - t0) / n
    return max(1, round(ms / 1000 / per_round))


def run(task: Task, args: argparse.Namespace, workers: int) -> float:
    """Samples/s of --steps optimizer steps with `workers` DataLoader workers (0: inline)."""
    torch.manual_seed(0)
    model = build_model()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    devices = [DeviceCapacity("cpu", "cpu", args.micro_batch, 0.001, 0.001)]
    plan = make_plan(args.global_batch, devices)
    sampler = GlobalBatchSampler(len(task.dataset), args.global_batch, seed=0)
    t0 = time.perf_counter()
    with StepLoader(task, sampler, plan, 0, num_workers=workers, stop=args.steps) as loader:
        for step in loader:
            acc.step(step.batches, loss_fn, global_items=args.global_batch)
            sampler.advance()
    return args.steps * args.global_batch / (time.perf_counter() - t0)


def train_ms_per_sample(task: Task, args: argparse.Namespace) -> float:
    """The training step alone (batches collated beforehand), per sample."""
    torch.manual_seed(0)
    model = build_model()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = torch.randn(args.micro_batch, FEATURES)
    batches = [(x, x)] * (args.global_batch // args.micro_batch)
    acc.step(batches, loss_fn, global_items=args.global_batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        acc.step(batches, loss_fn, global_items=args.global_batch)
    return (time.perf_counter() - t0) / 3 / args.global_batch * 1000


def table(title: str, task: Task, args: argparse.Namespace, configs: list[int]) -> dict[int, float]:
    """Prints samples/s per configuration (medians); returns each one's ratio to inline."""
    rates: dict[int, list[float]] = {w: [] for w in configs}
    for _ in range(args.repeats):  # interleaved: drift hits every configuration alike
        for w in configs:
            rates[w].append(run(task, args, w))
    inline = statistics.median(rates[0])
    print(title)
    for w in configs:
        med = statistics.median(rates[w])
        name = "inline" if w == 0 else f"workers={w}"
        spread = f"{min(rates[w]):.0f}..{max(rates[w]):.0f}"
        print(f"  {name:10} {med:7.1f} samples/s ({spread})  {med / inline:.2f}x inline")
    return {w: statistics.median(rates[w]) / inline for w in configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-ms", type=float, default=3.0)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # workers=4 on 2 cores is deliberate here (the waiting decode needs no core)
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    size = args.steps * args.global_batch
    rounds = calibrate_rounds(args.decode_ms)
    cpu_task = Task(build_model, DecodedDataset(size, rounds, 0.0), collate, loss_fn)
    sleep_task = Task(build_model, DecodedDataset(size, 1, args.decode_ms / 1000), collate, loss_fn)
    t0 = time.perf_counter()
    for i in range(20):
        cpu_task.dataset[i]
    decode_ms = (time.perf_counter() - t0) / 20 * 1000
    print(
        f"machine: {platform.machine()}, {cpus} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread in the training process"
    )
    train_ms = train_ms_per_sample(cpu_task, args)
    print(
        f"per sample: decode {decode_ms:.2f} ms (CPU), train {train_ms:.2f} ms; global batch "
        f"{args.global_batch} in micro-batches of {args.micro_batch}, "
        f"{args.steps} steps per run, median of {args.repeats}"
    )
    bound = (decode_ms + train_ms) / max(train_ms, (decode_ms + train_ms) / cpus)
    print(f"CPU-bound best case on {cpus} cores: {bound:.2f}x inline (all CPU work spread)")
    (busy0, ours0), wall0 = busy_seconds(), time.perf_counter()
    cpu = table("CPU-bound decode (hashing):", cpu_task, args, [0, 1, 2])
    wait = table("waiting decode (time.sleep):", sleep_task, args, [0, 1, 2, 4])
    (busy1, ours1), wall = busy_seconds(), time.perf_counter() - wall0
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (wall * cpus)
    print(f"other processes took {others:.0%} of the machine's CPU during the runs")
    print(
        f"RESULT workers=2 / inline = {cpu[2]:.2f}x samples/s (CPU-bound decode, {cpus} cores "
        f"shared by the training thread and the workers), {wait[2]:.2f}x (waiting decode); "
        f"workers=4 / inline = {wait[4]:.2f}x (waiting decode)"
    )


if __name__ == "__main__":
    main()
