"""Start-up to the first optimizer step, side by side, and the launcher's per-step overhead.

    python benchmarks/bench_launch.py [--repeats N]

Start-up: the same job (3 CPU ranks, the tiny GPT of `launcher.job.tasks.load_task` on the
same spec, global batch 32, gloo), timed from the moment the parent starts it until the
first optimizer step is done on every rank, three ways, in one command:

1. autobatch: a 3-device simulated job on an embedded local Ray, by the controller's
   start-up states (`JobController.phase_s`: connecting, reserving, probing, planning,
   starting, then first_step, the time in training until the controller saw a snapshot;
   it looks every 0.5 s), their sum, and `ranks_first_step`, from the ranks' own snapshot
   timestamps. First with a cold profile cache (the probe measures), then warm (every
   profile cached). The simulated devices are paced to their speeds (1, 0.5, 0.25) and
   count their memory, so autobatch's first step costs a little more than the others'.
2. The plain-DDP floor: 3 processes started by torch.multiprocessing (spawn); each
   imports, joins the process group (gloo on 127.0.0.1), builds the task and model, wraps
   it in DDP and takes one optimizer step on its share of the global batch.
3. Ray Train's TorchTrainer (3 CPU workers, gloo), with the same Ray start as autobatch's
   (`launcher.job.cluster.connect`), when `ray.train` imports here (`pip install
   'ray[train]'`); otherwise it is skipped, saying why.

Then the ratios autobatch warm / Ray Train and autobatch warm / plain DDP, by the time
until every rank took its first step (goals: <= 0.5 and <= 2). Every process runs
torch.set_num_threads(1). With --repeats N the warm runs are repeated, interleaved, and
the ratios are of medians (see docs/measuring.md: on a shared 2-core machine, compare
only figures from the same command).

Per step: the launcher's loop (1 simulated device at speed 1, so memory enforcement,
metrics and checkpoints but no pacing) against a plain loop in this process: the same
model, data, plan and accumulator. Steady state: the time between the rank's 10th and
last step snapshots. A simulated device counts every tensor to enforce its memory (a
dispatch mode, one Python call per op); a plain loop with that accounting is printed too,
since a real GPU does not pay it.

Only stdlib and torch are imported at the top: the plain-DDP ranks re-import this module
(spawn), and a plain DDP script does not import Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import socket
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from launcher.job.events import RunnerEvent
    from launcher.job.spec import JobSpec

TASK = {"dataset_size": 2048, "seq_len": 32, "d_model": 64, "n_layers": 2}
B, STEPS = 32, 60
SIMS = [
    {"name": "sim-a", "memory": "64MiB"},
    {"name": "sim-b", "memory": "24MiB", "speed": 0.5},
    {"name": "sim-c", "memory": "12MiB", "speed": 0.25},
]
WORLD = len(SIMS)


def spec(tmp: str, sims: list[dict], steps: int, name: str) -> dict:
    return {
        "name": name,
        "task_args": TASK,
        "global_batch_size": B,
        "max_steps": steps,
        "devices": {"select": "simulated", "simulated": sims, "keep_all": True},
        "checkpoint": {"dir": f"{tmp}/{name}", "interval": 1000, "resume": False},
    }


def job_spec(tmp: str, sims: list[dict], steps: int, name: str) -> JobSpec:
    from launcher.job.spec import parse_spec

    return parse_spec(spec(tmp, sims, steps, name))


def first_step_s(stamps: list[tuple[int, float]], t0: float) -> float:
    """From t0 until every rank had taken its first step: `stamps` are (rank, wall time)."""
    first: dict[int, float] = {}
    for rank, t in stamps:
        first[rank] = min(first.get(rank, t), t)
    if len(first) < WORLD:
        raise RuntimeError(f"first steps seen from ranks {sorted(first)} only, not {WORLD}")
    return max(first.values()) - t0


# ---------------------------------------------------------------------------
# 1. autobatch


def autobatch_startup(tmp: str, cache: str) -> dict[str, float]:
    """The controller's start-up phases, their sum, the ranks' first step, the wall time."""
    import ray

    from launcher.job.collector import SnapshotCollector
    from launcher.job.controller import JobController
    from launcher.job.events import Finished

    os.environ["AUTOBATCH_PROFILE_CACHE"] = cache
    held: dict[str, Any] = {}
    stamps: list[tuple[int, float]] = []

    def collector() -> Any:  # keeps every snapshot (host None: no /metrics server), to read
        held["actor"] = SnapshotCollector.remote(None)
        return held["actor"]

    def listener(event: RunnerEvent) -> None:
        if isinstance(event, Finished):  # Ray still runs: read the snapshots
            snaps = ray.get(held["actor"].drain.remote())
            stamps.extend((s.rank, s.timestamp_s) for s in snaps if s.optimizer_steps_total)

    runner = JobController(
        job_spec(tmp, SIMS, 2, "startup"), listener=listener, collector_factory=collector
    )
    t0, m0 = time.time(), time.monotonic()
    runner.run()
    phases = dict(runner.phase_s)
    phases["total_to_first_step"] = sum(runner.phase_s.values())
    phases["ranks_first_step"] = first_step_s(stamps, t0)
    phases["wall"] = time.monotonic() - m0
    return phases


# ---------------------------------------------------------------------------
# 2. the plain-DDP floor


def one_step(model: torch.nn.Module, task: Any, rank: int, world: int, seed: int) -> None:
    """One optimizer step on this rank's share of global batch 0 (loss SUM x world / N)."""
    from autobatch.planning.sampler import GlobalBatchSampler

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = GlobalBatchSampler(len(task.dataset), B, seed=seed).global_batch()
    loss = task.loss_fn(model, task.batch(batch[rank::world]))
    (loss * world / task.count_items(batch)).backward()
    optimizer.step()


def ddp_rank(rank: int, world: int, master: str, job: JobSpec, marks: Any) -> None:
    """One rank of the floor; puts (rank, {phase: wall time at its end}) on `marks`."""
    at = {"started": time.time()}
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from launcher.job.tasks import load_task

    dist.init_process_group("gloo", init_method=master, rank=rank, world_size=world)
    at["process_group"] = time.time()
    task = load_task(job)
    torch.manual_seed(job.seed)
    model = task.build_model()
    at["task_and_model"] = time.time()
    ddp = DistributedDataParallel(model)
    at["ddp"] = time.time()
    one_step(ddp, task, rank, world, job.seed)
    at["first_step"] = time.time()
    marks.put((rank, at))
    dist.destroy_process_group()


def ddp_startup(tmp: str) -> dict[str, float]:
    """Spawn, process group, task and model, DDP, first step: each phase until every rank
    ended it, and the total from the parent's start of the spawn."""
    import torch.multiprocessing as mp

    job = job_spec(tmp, SIMS, 2, "ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    marks = mp.get_context("spawn").SimpleQueue()
    t0 = time.time()
    procs = mp.start_processes(
        ddp_rank,
        args=(WORLD, f"tcp://127.0.0.1:{port}", job, marks),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    ranks = [marks.get() for _ in range(WORLD)]
    while not procs.join():
        pass
    phases, before = {}, t0
    for phase in ("started", "process_group", "task_and_model", "ddp", "first_step"):
        end = max(at[phase] for _, at in ranks)
        phases["spawn_and_import" if phase == "started" else phase] = end - before
        before = end
    phases["ranks_first_step"] = first_step_s([(r, at["first_step"]) for r, at in ranks], t0)
    return phases


# ---------------------------------------------------------------------------
# 3. Ray Train


def ray_train_rank(config: dict) -> None:
    """One TorchTrainer worker: the floor's rank, with Ray Train's process group and DDP."""
    at = time.time()
    torch.set_num_threads(1)
    import ray.train
    from ray.train.torch import prepare_model

    from launcher.job.tasks import load_task

    ctx = ray.train.get_context()
    rank, world, job = ctx.get_world_rank(), ctx.get_world_size(), config["spec"]
    task = load_task(job)
    torch.manual_seed(job.seed)
    one_step(prepare_model(task.build_model()), task, rank, world, job.seed)
    done = time.time()
    pathlib.Path(config["marks"], f"rank{rank}").write_text(f"{at!r} {done!r}")


def ray_train_startup(tmp: str) -> dict[str, float] | str:
    """Ray start, then TorchTrainer.fit until every worker took its first step; or why it
    was skipped."""
    try:
        import ray.train
        from ray.train.torch import TorchTrainer
    except ImportError as exc:
        why = exc.__cause__ or exc
        return (
            f"skipped: ray.train does not import here ({type(why).__name__}: {why}); "
            "pip install 'ray[train]' to compare"
        )
    import ray

    from launcher.job import cluster

    marks = pathlib.Path(tempfile.mkdtemp(dir=tmp, prefix="ray-train-"))
    t0, m0 = time.time(), time.monotonic()
    started = cluster.connect(None, num_cpus=max(4, WORLD + 2))  # as the controller does
    ray_start = time.monotonic() - m0
    try:
        trainer = TorchTrainer(
            ray_train_rank,
            train_loop_config={"spec": job_spec(tmp, SIMS, 2, "ray-train"), "marks": str(marks)},
            scaling_config=ray.train.ScalingConfig(num_workers=WORLD, use_gpu=False),
            run_config=ray.train.RunConfig(name="first-step", storage_path=f"{tmp}/ray-results"),
        )
        trainer.fit()
    except Exception as exc:  # a third party's failure: say it, keep the other figures
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return f"failed: {type(exc).__name__}: {lines[-1] if lines else ''}"  # the root cause
    finally:
        if started:
            ray.shutdown()
    wall = time.monotonic() - m0
    ranks = [(int(p.name[4:]), *map(float, p.read_text().split())) for p in marks.iterdir()]
    workers_up = max(at for _, at, _ in ranks)
    done = first_step_s([(r, t) for r, _, t in ranks], t0)
    return {
        "ray_start": ray_start,
        "trainer_to_workers": workers_up - t0 - ray_start,
        "workers_to_first_step": t0 + done - workers_up,
        "ranks_first_step": done,
        "wall": wall,
    }


# ---------------------------------------------------------------------------
# per step


def launcher_step_s(tmp: str) -> float:
    from launcher.job.controller import JobController
    from launcher.job.events import Progress

    stamps: dict[int, float] = {}

    def listener(event: RunnerEvent) -> None:
        if isinstance(event, Progress):
            for s in event.snapshots:
                stamps.setdefault(s.optimizer_steps_total, s.timestamp_s)

    sims = [{"name": "sim-one", "memory": "512MiB"}]
    JobController(job_spec(tmp, sims, STEPS, "steady"), listener=listener).run()
    steps = sorted(k for k in stamps if k >= 10)
    return (stamps[steps[-1]] - stamps[steps[0]]) / (steps[-1] - steps[0])


def plain_step_s(tmp: str, *, enforce_memory: bool) -> float:
    from autobatch.planning.plan import DeviceCapacity
    from autobatch.planning.planner import make_plan
    from autobatch.planning.sampler import GlobalBatchSampler
    from autobatch.probe.simulated import TensorMemory
    from autobatch.step.accumulate import Accumulator
    from launcher.job.tasks import load_task

    task = load_task(job_spec(tmp, [{"name": "x", "memory": "1GiB"}], STEPS, "plain"))
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


# ---------------------------------------------------------------------------


def show(label: str, phases: dict[str, float] | str) -> None:
    if isinstance(phases, str):
        print(f"start-up to first optimizer step ({label}): {phases}")
        return
    parts = "  ".join(f"{k} {v:.2f}s" for k, v in phases.items())
    print(f"start-up to first optimizer step ({label}): {parts}")


def ratios(warm: list[float], floor: list[float], ray_train: list[float], why: str) -> str:
    ours = statistics.median(warm)
    vs_ddp = f"autobatch warm / plain DDP {ours / statistics.median(floor):.2f} (goal <= 2)"
    if not ray_train:
        return f"autobatch warm / Ray Train not measured ({why.split(' (')[0]}); {vs_ddp}"
    vs_ray = ours / statistics.median(ray_train)
    return f"autobatch warm / Ray Train {vs_ray:.2f} (goal <= 0.5); {vs_ddp}"


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="warm runs, interleaved")
    repeats = parser.parse_args().repeats
    torch.set_num_threads(1)
    warm, floor, ray_train, why = [], [], [], ""
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(pathlib.Path(tmp) / "profiles")
        show("autobatch, cold profile cache", autobatch_startup(tmp, cache))
        for _ in range(repeats):
            phases = autobatch_startup(tmp, cache)
            show("autobatch, warm profile cache", phases)
            warm.append(phases["ranks_first_step"])
            phases = ddp_startup(tmp)
            show(f"plain DDP, {WORLD} spawned processes, gloo", phases)
            floor.append(phases["ranks_first_step"])
            theirs = ray_train_startup(tmp)
            show(f"Ray Train TorchTrainer, {WORLD} workers, gloo", theirs)
            if isinstance(theirs, str):
                why = theirs
            else:
                ray_train.append(theirs["ranks_first_step"])
        median = f"median of {repeats}, " if repeats > 1 else ""
        print(
            f"start-up ratios ({median}until every rank took its first step): "
            + ratios(warm, floor, ray_train, why)
        )
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
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
