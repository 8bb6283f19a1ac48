"""Start-up to the first optimizer step, side by side, and the launcher's per-step overhead.

    python benchmarks/bench_launch.py [--repeats N] [--step-repeats N] [--per-step-only]

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

Per step (`--per-step-only`: this part alone): the launcher's loop against a plain loop in
this process (the same model, data, plan and accumulator), on two kinds of device, as
--step-repeats interleaved pairs (launcher, plain; plain, launcher; ...): a simulated
device at speed 1 (memory counted by a dispatch mode, one Python call per op, no pacing:
what the demo pays) against the plain loop with that accounting, and this machine's CPU as
a real device (nothing simulated: what a GPU run pays) against the bare plain loop. The
launcher's side is its rank loop (`launcher.job.train.train_rank`, what every worker actor
runs) in this process, its snapshots pushed to a collector actor on a local Ray as a
worker pushes them: the same process and thread as the plain loop, so the comparison is of
the loops, not of where Ray placed a process. Its steps are the differences between
consecutive steps' snapshot timestamps (the whole loop: data, step, snapshot, ledger,
checkpoint check), from step `STEADY` on;
each run gives its median step; printed: the median and range of the runs' medians and
the ratio launcher / plain of each pair (median and range). Then the loop's own costs,
each timed alone in this process over many calls (medians): a snapshot's push (a Ray
call to a collector actor, the snapshot pickled), a ledger line (the launcher's `AuditLedger`,
local directory), the step's small all-reduce (3 numbers; a 1-rank gloo group: the call's
cost, not the wait for other ranks), the DataLoader's next step against collating inline,
the compute clock's hooks (one call per parameter and micro-step, the step's read-out and
the window's bookkeeping, timed alone), the simulated memory accounting (plain loop with
minus without) and rebalancing's measurement as a whole (the plain loop with the clock
minus without, interleaved: on a busy machine within the noise), each also as a share of
the plain CPU loop's step.

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
# per step: the launcher's loop against a plain loop, interleaved, and the loop's own costs

ONE_SIM = [{"name": "sim-one", "memory": "512MiB"}]  # speed 1: memory counted, no pacing
PLAIN_CPU = {"select": "all"}  # this machine's CPU as a real device: nothing simulated
STEADY = 10  # steps not timed (warm-up: shapes, allocator, DataLoader workers)
ITERATIONS = 300  # per component timed in isolation


def launcher_step_times(
    tmp: str, device: Any, name: str, forward: Any, steps: int = STEPS
) -> list[float]:
    """The launcher's rank loop (`train_rank`, what each worker actor runs) in this process
    on `device`, each snapshot handed to `forward` (a collector actor's push.remote, as a
    worker pushes it): the time per step between
    consecutive steps' snapshots (the whole loop: data, step, snapshot, ledger, checkpoint
    check), from step `STEADY` on."""
    from autobatch.planning.plan import DeviceCapacity
    from autobatch.planning.planner import make_plan
    from launcher.job.context import RankContext
    from launcher.job.train import train_rank

    plan = make_plan(B, [DeviceCapacity("cpu", device.name, 512, 0.001, 0.001)])
    ctx = RankContext(
        job=name,
        spec=job_spec(tmp, ONE_SIM, steps, name),
        precision="fp32",
        plan_json=plan.to_json(),
        rank=0,
        device=device,
        node="local",
        checkpoint_dir=f"{tmp}/{name}",
        output_dir=None,
        resume_from=None,
        attempt=0,
        run=name,
    )
    stamps: dict[int, float] = {}

    def push(snapshot: Any) -> None:
        stamps.setdefault(snapshot.optimizer_steps_total, snapshot.timestamp_s)
        forward(snapshot)

    train_rank(ctx, push)
    done = sorted(k for k in stamps if k >= STEADY)
    return [stamps[b] - stamps[a] for a, b in zip(done, done[1:]) if b == a + 1]


def plain_parts(tmp: str) -> tuple[Any, Any, Any, Any, Any]:
    """The plain loop's task, model, accumulator, plan and sampler (seeded as the job)."""
    from autobatch.planning.plan import DeviceCapacity
    from autobatch.planning.planner import make_plan
    from autobatch.planning.sampler import GlobalBatchSampler
    from autobatch.step.accumulate import Accumulator
    from launcher.job.tasks import load_task

    task = load_task(job_spec(tmp, [{"name": "x", "memory": "1GiB"}], STEPS, "plain"))
    torch.manual_seed(0)
    model = task.build_model()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=3e-3), max_grad_norm=1.0)
    plan = make_plan(B, [DeviceCapacity("cpu", "cpu", 512, 0.001, 0.001)])
    sampler = GlobalBatchSampler(len(task.dataset), B, seed=0)
    return task, model, acc, plan, sampler


def plain_step_times(tmp: str, *, enforce_memory: bool, clock: bool = False) -> list[float]:
    """A plain loop in this process: the same model, data, plan and accumulator; with the
    simulated device's memory accounting, or with the launcher's compute clock."""
    from autobatch.probe.simulated import TensorMemory
    from launcher.job.rebalancing import ComputeClock, Rebalancer

    task, model, acc, plan, sampler = plain_parts(tmp)
    memory = TensorMemory(2**29, model=model, optimizer=acc.optimizer) if enforce_memory else None
    timer = ComputeClock(model, torch.device("cpu")) if clock else None
    rebalancer = Rebalancer()
    loss_fn = timer.wrap(task.loss_fn) if timer else task.loss_fn
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        mbs = [task.batch(i) for i in sampler.micro_batches(plan, 0)]
        n = task.count_items(sampler.global_batch())
        if timer:
            timer.start_step()
        with memory if memory is not None else contextlib.nullcontext():
            result = acc.step(mbs, loss_fn, global_items=n)
        if timer:
            spans = timer.step_compute(len(result.micro_step_s))
            rebalancer.observe(sum(c or 0.0 for c in spans), 0.001)
        sampler.advance()
        times.append(time.perf_counter() - t0)
    if timer:
        timer.close()
    return times[STEADY:]


def per_call_s(fn: Any, n: int = ITERATIONS) -> float:
    """The median seconds of one call of `fn` over `n` calls (after 10 not timed)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def component_costs(tmp: str, snapshot: Any, collector: Any) -> dict[str, float]:
    """What the launcher's loop does per step beyond the plain loop, each timed alone in this
    process (median of `ITERATIONS` calls; seconds per step)."""
    from types import SimpleNamespace

    import ray
    import torch.distributed as dist

    from autobatch.tasks.loader import StepLoader, default_num_workers
    from launcher.job.audit import AuditLedger

    costs = {"snapshot push (Ray call)": per_call_s(lambda: collector.push.remote(snapshot))}
    ray.get(collector.drain.remote())
    task, model, acc, plan, sampler = plain_parts(tmp)
    indices = [list(mb) for mb in sampler.micro_batches(plan, 0)]
    ctx = SimpleNamespace(checkpoint_dir=f"{tmp}/ledger", rank=0, run="bench", attempt=0)
    audit = AuditLedger(ctx)
    costs["ledger line"] = per_call_s(lambda: audit.record(0, indices))
    with socket.socket() as s:  # the step's small all-reduce (loss, OOM flag, samples)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        sums = torch.tensor([1.0, 0.0, 32.0], dtype=torch.float64)
        costs["small all-reduce (1-rank gloo: the call, no wait)"] = per_call_s(
            lambda: dist.all_reduce(sums)
        )
    finally:
        dist.destroy_process_group()
    workers = default_num_workers(1)
    loader = StepLoader(task, sampler, plan, 0, num_workers=workers, stop=STEPS + 20)
    try:
        costs[f"data: DataLoader ({workers} workers) next step"] = per_call_s(
            lambda: next(loader), n=STEPS
        )
    finally:
        loader.close()
    from launcher.job.rebalancing import ComputeClock, Rebalancer

    clock, rebalancer = ComputeClock(model, torch.device("cpu")), Rebalancer()
    clock.start_step()
    clock.wrap(lambda m, b: None)(model, None)  # a micro-step's start
    grads = [p for p in model.parameters() if p.requires_grad]
    micro_steps = len(plan.ranks[0].micro_batches)
    hook = per_call_s(lambda: clock._gradient(grads[0]))  # one parameter's gradient hook
    costs["compute clock's hooks (one per parameter and micro-step, timed alone)"] = (
        hook * len(grads) * micro_steps
        + per_call_s(lambda: clock.step_compute(1))
        + per_call_s(lambda: rebalancer.observe(0.01, 0.01))
    )
    clock.close()
    costs["data: inline collate (the plain loop's)"] = per_call_s(
        lambda: [task.batch(i) for i in sampler.micro_batches(plan, 0)], n=STEPS
    )
    return costs


def spread(values: list[float]) -> str:
    """'median ms (min-max)'."""
    low, mid, high = (x * 1e3 for x in (min(values), statistics.median(values), max(values)))
    return f"{mid:.1f} ms ({low:.1f}-{high:.1f})"


def per_step(tmp: str, repeats: int) -> list[str]:
    """Interleaved repeats (ABBA...): per device kind, the launcher's and the plain loop's
    median step per run; the ratio of each pair, their median and range; then the costs."""
    import ray

    from autobatch.probe.devices import SimulatedDevice, cpu_device
    from launcher.job.collector import SnapshotCollector

    kinds = {
        "simulated device (memory counted, what the demo pays)": (
            SimulatedDevice("sim-one", 512 * 2**20).info(0),
            True,
        ),
        "plain CPU device (nothing simulated, what a GPU run pays)": (cpu_device(), False),
    }
    collector = SnapshotCollector.remote(None)
    runs: dict[str, dict[str, list[float]]] = {k: {"launcher": [], "plain": []} for k in kinds}
    for r in range(repeats):
        for k, (kind, (device, enforce)) in enumerate(kinds.items()):
            for who in ["launcher", "plain"][:: 1 if r % 2 == 0 else -1]:
                if who == "launcher":
                    times = launcher_step_times(
                        tmp, device, f"steady-{r}-{k}", collector.push.remote
                    )
                    ray.get(collector.drain.remote())
                else:
                    times = plain_step_times(tmp, enforce_memory=enforce)
                runs[kind][who].append(statistics.median(times))
    lines = []
    for kind, got in runs.items():
        ratios = [a / b for a, b in zip(got["launcher"], got["plain"])]
        lines.append(
            f"per-step time, {kind}: launcher {spread(got['launcher'])}, plain loop "
            f"{spread(got['plain'])} (median, min-max of {repeats} interleaved runs' medians); "
            f"launcher / plain {statistics.median(ratios):.2f} (per pair "
            f"{min(ratios):.2f}-{max(ratios):.2f}; goal <= 1.05)"
        )
    clocked = [
        statistics.median(plain_step_times(tmp, enforce_memory=False, clock=c))
        for _ in range(repeats)
        for c in (False, True)
    ]
    off, on = clocked[0::2], clocked[1::2]
    snapshot = _a_snapshot(tmp)
    costs = component_costs(tmp, snapshot, collector)
    ray.kill(collector)
    sim, cpu = (got["plain"] for got in runs.values())
    costs["simulated memory accounting (plain loop with - without)"] = statistics.median(
        a - b for a, b in zip(sim, cpu)
    )
    costs["rebalancing's measurement (compute clock + observe: with - without)"] = (
        statistics.median(a - b for a, b in zip(on, off))
    )
    base = statistics.median(cpu)
    parts = "; ".join(f"{k} {v * 1e3:.3f} ms ({v / base:.1%})" for k, v in costs.items())
    lines.append(
        f"per-step costs, each timed alone in this process (median; share of the plain CPU "
        f"loop's {base * 1e3:.1f} ms step): {parts}"
    )
    return lines


def _a_snapshot(tmp: str) -> Any:
    """One step's snapshot as a rank pushes it (from a short run of the rank loop)."""
    from autobatch.probe.devices import cpu_device

    kept: list[Any] = []
    launcher_step_times(tmp, cpu_device(), "snapshot", kept.append, steps=STEADY + 2)
    return kept[-1]


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


def startup(tmp: str, cache: str, repeats: int) -> None:
    """The start-up comparison (the module docstring's 1-3), printed as it goes."""
    warm, floor, ray_train, why = [], [], [], ""
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


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="warm runs, interleaved")
    parser.add_argument(
        "--step-repeats", type=int, default=5, help="per-step runs of each loop, interleaved"
    )
    parser.add_argument("--per-step-only", action="store_true", help="skip the start-up part")
    args = parser.parse_args()
    repeats, step_repeats = args.repeats, args.step_repeats
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(pathlib.Path(tmp) / "profiles")
        os.environ["AUTOBATCH_PROFILE_CACHE"] = cache  # the per-step runs probe once
        if not args.per_step_only:
            startup(tmp, cache, repeats)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            for line in per_step(tmp, step_repeats):
                print(line)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
