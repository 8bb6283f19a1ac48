"""Measure-and-fit probe vs trial and error, side by side on simulated devices.

For each simulated device (exact tensor accounting, memory enforced like a GPU:
torch.OutOfMemoryError past its declared size), sized as a multiple of the tiny
GPT's batch-1 footprint (one training step at micro-batch 1, AdamW foreach):

  ours        `profile_model` with headroom 0, so that it plays by the others'
              rule (the largest size that ran); and with the default 5% headroom.
  lightning   Lightning's scale_batch_size(mode="binsearch", steps_per_trial=3):
              from 2, double after each trial that runs, bisect after the first
              OOM; every trial runs 3 training steps (an OOM ends a trial).
  accelerate  Accelerate's find_executable_batch_size(starting_batch_size=128):
              it wraps the training itself and restarts it at x0.9 after an OOM;
              here an attempt is 3 training steps (the 2nd is the first with the
              optimizer state alive), and it costs the steps it ran.
  reference   not a method: the largest micro-batch that trains with 2
              micro-batches per step, by brute-force bisection. (Training here
              copies each micro-batch to the device inside the loss function, so
              it is freed before backward; the probe keeps it through backward,
              as a loop that moves it before the forward does: ours may be one
              sample under the reference.)

The baselines' steps are plain training steps (one micro-batch, then the
optimizer step), as those tools run them. Each method's micro-batch is then
trained for 3 optimizer steps with the library's Accumulator on a fresh model
under the device's enforcement, with 1 micro-batch per step and with 2
(accumulation, which the planner uses whenever the global batch is larger).

All steps of all methods run under the same accounting, one thread, in one
process, so wall-time ratios are comparable; absolute times are this machine's.

    .venv/bin/python benchmarks/bench_probe.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autobatch.probe.devices import SimulatedDevice, cpu_device
from autobatch.probe.measure import StepRunner
from autobatch.probe.profile import NoFitError, profile_model
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import tiny_gpt_task

MULTIPLES = (0.5, 1.5, 4, 16, 48)  # device memory / batch-1 footprint
TRAIN_STEPS = 3


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


class PlainTrainer:
    """Training steps on a simulated device, as a training loop runs them."""

    def __init__(self, task: Task, device: SimulatedDevice) -> None:
        self.task = task
        self.model = task.build_model()
        self.opt = adamw(self.model)
        self.acc = Accumulator(self.model, self.opt)
        self.mem = TensorMemory(device.memory_bytes, model=self.model, optimizer=self.opt)
        self.steps = 0

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        # the copy to the device: the micro-batch is on it during its micro-step only
        return self.task.loss_fn(model, {k: v.clone() for k, v in batch.items()})

    def step(self, b: int, micro_steps: int = 1) -> bool:
        """One optimizer step of `micro_steps` x b samples; False if it ran out of memory."""
        self.steps += 1
        batches = [self.task.probe_batch(b) for _ in range(micro_steps)]
        ran = False
        with contextlib.suppress(torch.OutOfMemoryError), self.mem:
            self.acc.step(batches, self.loss, global_items=micro_steps * b)
            ran = True
        if not ran:  # recover outside the handler
            self.opt.zero_grad(set_to_none=True)
            gc.collect()
        return ran


def lightning_binsearch(
    trainer: PlainTrainer, steps_per_trial: int = 3, max_trials: int = 25
) -> int:
    """Lightning's _run_binary_scaling: the size it returns (it never tries below 2)."""
    new_size, low, high, count = 2, 1, None, 0
    while True:
        ran = all(trainer.step(new_size) for _ in range(steps_per_trial))  # stops at an OOM
        if ran:
            count += 1
            if count > max_trials:
                return new_size
            low = new_size
            if high:
                if high - low <= 1:
                    return new_size
                new_size = (high + low) // 2
            else:
                new_size *= 2
        else:
            high = new_size
            new_size = (high + low) // 2
            if high - low <= 1:
                return new_size


def accelerate_shrink(trainer: PlainTrainer, start: int = 128) -> int:
    """Accelerate's find_executable_batch_size: x0.9 per OOM; 0 means it gave up."""
    b = start
    while b > 0 and not all(trainer.step(b) for _ in range(TRAIN_STEPS)):
        b = int(b * 0.9)
    return b


def reference_max(task: Task, device: SimulatedDevice, micro_steps: int = 2) -> int:
    """The largest b whose steady-state training step (2 micro-batches) runs: bisection."""
    trainer = PlainTrainer(task, device)
    if not trainer.step(1):  # builds the optimizer state
        return 0
    lo, hi = 0, 1
    while trainer.step(hi, micro_steps):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if trainer.step(mid, micro_steps) else (lo, mid)
    return lo


@dataclass
class Result:
    micro_batch: int
    steps: int
    wall_s: float
    trains: dict[int, bool]  # micro-steps per optimizer step -> ran without OOM


def run_method(
    method: Callable[[], tuple[int, int]], task: Task, device: SimulatedDevice
) -> Result:
    t0 = time.perf_counter()
    b, steps = method()
    wall = time.perf_counter() - t0
    trains = {}
    for k in (1, 2):
        trainer = PlainTrainer(task, device)
        trains[k] = b > 0 and all(trainer.step(b, k) for _ in range(TRAIN_STEPS))
    return Result(b, steps, wall, trains)


def methods(task: Task, device: SimulatedDevice) -> dict[str, Callable[[], tuple[int, int]]]:
    def ours(headroom: float) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            try:
                p = profile_model(task, device, make_optimizer=adamw, headroom_fraction=headroom)
            except NoFitError as e:  # one sample does not fit: it says so, after its steps
                return 0, e.measured_steps
            return p.max_micro_batch, p.measured_steps

        return run

    def baseline(search: Callable[[PlainTrainer], int]) -> Callable[[], tuple[int, int]]:
        def run() -> tuple[int, int]:
            trainer = PlainTrainer(task, device)
            return search(trainer), trainer.steps

        return run

    return {
        "ours": ours(0.0),
        "ours (5% headroom)": ours(0.05),
        "lightning": baseline(lightning_binsearch),
        "accelerate": baseline(accelerate_shrink),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="median wall time over N runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = tiny_gpt_task(dataset_size=64)
    runner = StepRunner(task, cpu_device(), make_optimizer=adamw)
    runner.run(1)
    footprint = runner.run(1).peak_bytes  # steady state: the optimizer state exists
    runner.close()
    print(
        f"tiny GPT, AdamW(foreach=True), fp32; batch-1 footprint {footprint / 2**20:.2f} MiB; "
        f"torch {torch.__version__}, 1 thread, {args.repeats} repeat(s) (median wall time)"
    )
    header = f"{'device':<22}{'method':<20}{'micro-batch':>12}{'steps':>7}{'wall s':>9}"
    header += f"{'train k=1':>11}{'train k=2':>11}"
    for multiple in MULTIPLES:
        device = SimulatedDevice(f"sim-{multiple:g}x", int(multiple * footprint))
        print(f"\n{header}")
        label = f"{device.name} ({device.memory_bytes / 2**20:.1f} MiB)"
        print(f"{label:<22}{'reference':<20}{reference_max(task, device):>12}")
        results = {}
        for name, method in methods(task, device).items():
            runs = [run_method(method, task, device) for _ in range(args.repeats)]
            r = runs[0]
            r.wall_s = statistics.median(x.wall_s for x in runs)
            results[name] = r
            trains = ["ok" if r.trains[k] else "OOM" for k in (1, 2)]
            print(
                f"{'':<22}{name:<20}{r.micro_batch:>12}{r.steps:>7}{r.wall_s:>9.2f}"
                f"{trains[0]:>11}{trains[1]:>11}"
            )
        ours = results["ours"]
        for name in ("lightning", "accelerate"):
            other = results[name]
            size = f"{ours.micro_batch / other.micro_batch:.2f}x" if other.micro_batch else "n/a"
            print(
                f"{'':<22}{name} / ours: steps {other.steps / ours.steps:.1f}x, wall "
                f"{other.wall_s / ours.wall_s:.1f}x; micro-batch ours / {name}: {size}"
            )


if __name__ == "__main__":
    main()
