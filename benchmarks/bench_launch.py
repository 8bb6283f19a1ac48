"""Launcher start-up by phase, and its per-step overhead against a plain training loop.

    python benchmarks/bench_launch.py

1. Time from start to the first optimizer step of a 3-device simulated job on an
   embedded local Ray, split into Ray start, reserve, probe, plan, worker start,
   process-group set-up, first step (the probe measures; a second run hits the
   profile cache: both are printed).
2. Per-step time of the launcher's loop (1 simulated device at speed 1, so
   memory enforcement, metrics and checkpoints but no pacing) against a plain
   loop in this process: the same model, data, plan and accumulator. Steady
   state: the time between the rank's 10th and last step snapshots. A simulated
   device counts every tensor to enforce its memory (a dispatch mode, one Python
   call per op); a plain loop with that accounting is printed too, since a real
   GPU does not pay it.
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import tempfile
import time

import torch

from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from launcher.job.events import Progress, RunnerEvent
from launcher.job.controller import JobController
from launcher.job.spec import parse_spec
from launcher.job.tasks import load_task

TASK = {"dataset_size": 2048, "seq_len": 32, "d_model": 64, "n_layers": 2}
B, STEPS = 32, 60


def spec(tmp: str, sims: list[dict], steps: int, name: str) -> dict:
    return {
        "name": name,
        "task_args": TASK,
        "global_batch_size": B,
        "max_steps": steps,
        "devices": {"select": "simulated", "simulated": sims, "keep_all": True},
        "checkpoint": {"dir": f"{tmp}/{name}", "interval": 1000, "resume": False},
    }


def startup(tmp: str, cache: str) -> dict[str, float]:
    import os

    os.environ["AUTOBATCH_PROFILE_CACHE"] = cache
    sims = [
        {"name": "sim-a", "memory": "64MiB"},
        {"name": "sim-b", "memory": "24MiB", "speed": 0.5},
        {"name": "sim-c", "memory": "12MiB", "speed": 0.25},
    ]
    runner = JobController(parse_spec(spec(tmp, sims, 2, "startup")))
    t0 = time.monotonic()
    runner.run()
    phases = dict(runner.phase_s)
    phases["total_to_first_step"] = sum(runner.phase_s.values())
    phases["wall"] = time.monotonic() - t0
    return phases


def launcher_step_s(tmp: str) -> float:
    stamps: dict[int, float] = {}

    def listener(event: RunnerEvent) -> None:
        if isinstance(event, Progress):
            for s in event.snapshots:
                stamps.setdefault(s.optimizer_steps_total, s.timestamp_s)

    sims = [{"name": "sim-one", "memory": "512MiB"}]
    JobController(parse_spec(spec(tmp, sims, STEPS, "steady")), listener=listener).run()
    steps = sorted(k for k in stamps if k >= 10)
    return (stamps[steps[-1]] - stamps[steps[0]]) / (steps[-1] - steps[0])


def plain_step_s(tmp: str, *, enforce_memory: bool) -> float:
    s = parse_spec(spec(tmp, [{"name": "x", "memory": "1GiB"}], STEPS, "plain"))
    task = load_task(s)
    torch.manual_seed(0)
    model = task.build_model()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=3e-3), max_grad_norm=1.0)
    plan = make_plan(B, [DeviceCapacity("cpu", "cpu", 512, 0.001, 0.001)])
    sampler = GlobalBatchSampler(len(task.dataset), B, seed=0)
    memory = TensorMemory(2**29, model=model, optimizer=acc.optimizer) if enforce_memory else None
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        mbs = [task.batch(i) for i in sampler.micro_batches(plan, 0)]
        n = task.count_items(sampler.global_batch())
        with memory if memory is not None else contextlib.nullcontext():
            acc.step(mbs, task.loss_fn, global_items=n)
        sampler.advance()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:])


def main() -> None:
    import ray

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(pathlib.Path(tmp) / "profiles")
        for label in ("cold profile cache", "warm profile cache"):
            phases = startup(tmp, cache)
            parts = "  ".join(f"{k} {v:.2f}s" for k, v in phases.items())
            print(f"start-up to first optimizer step ({label}): {parts}")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            launched = launcher_step_s(tmp)
        finally:
            ray.shutdown()
        plain = plain_step_s(tmp, enforce_memory=False)
        enforced = plain_step_s(tmp, enforce_memory=True)
    print(
        f"per-step time: launcher {launched * 1e3:.1f} ms, plain loop {plain * 1e3:.1f} ms "
        f"(ratio {launched / plain:.2f}), plain loop with the simulated device's memory "
        f"accounting {enforced * 1e3:.1f} ms (ratio {launched / enforced:.2f})"
    )


if __name__ == "__main__":
    main()
