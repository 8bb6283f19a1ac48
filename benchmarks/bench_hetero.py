"""The heterogeneity win, measured: autobatch's plan vs the equal split vs the ideal.

    .venv/bin/python benchmarks/bench_hetero.py [--repeats 2] [--speed-scale 0.25]

The launcher on a local Ray trains the demo model (configs/demo.yaml: tiny GPT,
seq_len 64, global batch 128, AdamW, fp32) on three simulated devices whose
memory and speed ratios are those of an A100-80GB, an L4-24GB and a T4-16GB
(autobatch.estimate.GPU_SPECS: memory in MiB / 2560; speed proportional to the
dense bf16/fp16 tensor peak, 312 : 121 : 65 TF/s, times --speed-scale). In one
command it measures samples/s of

  (a) plan         autobatch's plan (planner: optimal, the default keep_all: false),
  (b) equal split  every device at the smallest device's micro-batch, the same
                   accumulation everywhere (planner: equal_split; today's DDP recipe),
  (c) ideal        the sum of each device's standalone best: one one-device job
                   per device, the whole global batch on it,

and prints efficiency = a / c, speedup = a / b, and per rank the sync wait (the
worker's `sync_wait_s`: how much longer the synced micro-step took than the
rank's own compute for it, i.e. the wait for the slowest rank plus the
all-reduce) as a share of the step time. (a) and (b) run `--repeats` times,
interleaved, and the medians are printed; (c) runs once per device. Then it
splits the gap to the ideal into what the planner predicted from the measured
profiles (the cost of splitting one step over three devices) and what the runs
added on top of the prediction.

Measuring on 2 shared cores (see DESIGN.md): every worker runs one thread at
the default niceness (Ray's workers otherwise run at nice 15 and lose the CPU to
anything else). A simulated device's time is MODELLED: the script first times
the demo model's work in this process (forward+backward per micro-batch size,
the optimizer step; a low quantile of 12 runs, fitted to lines), and in every
Ray worker a set-up hook replaces `autobatch.simulated.Pacer` by one that runs
the work for real and then sleeps until reference / speed (`model_pacing`). The
product's Pacer instead stretches the measured time by 1/speed, which on these
shared cores multiplies the neighbours' load into the device's speed (x10 on
the T4; run it with --product-pacer). All speeds are <= --speed-scale (0.25), so
the real work needs a quarter of the modelled time or less and the modelled
time dominates even when the cores are shared. The optimizer step is modelled
the same way; the all-reduce, DDP's bucket copies, data loading and metrics run
at their real cost. Speeds are absolute (relative to this machine), not divided
by the job's fastest as the runner does, so a device alone runs at the speed it
has in the mix: see `absolute_speeds`. Profiles are measured once, in the first
job (the probe runs under the same modelled clock), and reused from the profile
cache by the others. Throughput is steady state: from the timestamps of rank
0's metrics snapshots, after the first steps. Before each job the script waits
(up to --quiet-wait s) for other processes to leave the CPU, and prints the
share of the 2 cores other processes used during each job.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import ray

import launcher.runner
from autobatch.devices import SimulatedDevice
from autobatch.errors import LaunchError
from autobatch.estimate import GPU_SPECS
from autobatch.plan import Plan
from launcher.job import parse_spec
from launcher.runner import JobRunner

MIX = ("A100-80GB", "L4-24GB", "T4-16GB")
MIB_PER_SIM_MIB = 2560  # an 80 GiB GPU becomes a 32 MiB simulated device
TASK_ARGS = {"dataset_size": 8192, "seq_len": 64}  # the demo's model and data (configs/demo.yaml)
GLOBAL_BATCH = 128  # the demo's
# (optimizer steps, steps left out of the steady state) per kind of job: long enough for a
# steady state, short enough for ~5 minutes (a T4 alone takes ~6 s per step).
STEPS = {"optimal": (20, 2), "equal_split": (10, 2), "alone": (4, 1)}


# ---------------------------------------------------------------------------
# the machine


def _proc_stat_busy() -> int:
    """Busy jiffies of the whole machine (all CPUs)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _tree_jiffies(root: int) -> int:
    """CPU jiffies of `root` and its descendants (with their reaped children)."""
    parent, times = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        times[int(pid)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    mine, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        children = [c for c, pp in parent.items() if pp == p and c not in mine]
        mine.update(children)
        frontier += children
    return sum(times.get(p, 0) for p in mine)


class ForeignLoad:
    """Share of the machine's cores that processes outside this benchmark used."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    def start(self) -> None:
        self.t, self.busy = time.monotonic(), _proc_stat_busy()
        self.mine = _tree_jiffies(os.getpid())

    def share(self) -> float:
        seconds = time.monotonic() - self.t
        foreign = (_proc_stat_busy() - self.busy) - (_tree_jiffies(os.getpid()) - self.mine)
        return max(0.0, foreign / self.hz / seconds / self.cores)

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.1) -> float:
        """Wait until others use < threshold of the cores over 3 s (at most max_wait_s)."""
        deadline = time.monotonic() + max_wait_s
        while True:
            self.start()
            time.sleep(3)
            share = self.share()
            if share < threshold or time.monotonic() > deadline:
                return share


# ---------------------------------------------------------------------------
# one job


@dataclass(frozen=True)
class Measured:
    """One job's steady state."""

    label: str
    samples_per_s: float
    step_s: tuple[float, ...]  # per rank: mean step duration
    sync_s: tuple[float | None, ...]  # per rank: mean sync wait
    foreign_load: float
    plan: Plan

    def sync_share(self, rank: int) -> float | None:
        wait = self.sync_s[rank]
        return None if wait is None else wait / self.step_s[rank]


@dataclass
class _Recorder:
    """Listener of one job: rank 0's first timestamp per step, every rank's step and wait."""

    skip: int
    stamps: dict[int, float] = field(default_factory=dict)
    steps: dict[tuple[int, int], tuple[float, float | None]] = field(default_factory=dict)
    plan: Plan | None = None

    def __call__(self, event: str, details: dict) -> None:
        if event == "plan":
            self.plan = details["plan"]
        if event != "progress":
            return
        for s in details["snapshots"]:
            if s.rank == 0:
                self.stamps.setdefault(s.optimizer_steps_total, s.timestamp_s)
            if s.optimizer_steps_total > self.skip and s.step_duration_s:
                self.steps[(s.rank, s.optimizer_steps_total)] = (s.step_duration_s, s.sync_wait_s)

    def samples_per_s(self, global_batch: int) -> float:
        steps = sorted(k for k in self.stamps if k >= self.skip)
        if len(steps) < 2:
            raise RuntimeError(f"too few steady-state snapshots: steps {sorted(self.stamps)}")
        first, last = steps[0], steps[-1]
        return global_batch * (last - first) / (self.stamps[last] - self.stamps[first])

    def per_rank(self, rank: int) -> tuple[float, float | None]:
        seen = [v for (r, _), v in self.steps.items() if r == rank]
        waits = [w for _, w in seen if w is not None]
        return statistics.fmean(d for d, _ in seen), statistics.fmean(waits) if waits else None


# ---------------------------------------------------------------------------
# the simulated devices' clock


@dataclass(frozen=True)
class Reference:
    """This machine's quiet time for the demo model's work: one thread, memory accounting on.

    A simulated device of speed s takes `micro(b) / s` per micro-step of b samples
    (forward and backward) and `optimizer_s / s` per optimizer step, like a GPU whose
    time model is a line: the work is run for real, then the device sleeps the rest.
    """

    fixed_s: float  # forward + backward: fixed_s + per_sample_s * b
    per_sample_s: float
    backward_fixed_s: float  # the backward alone, likewise
    backward_per_sample_s: float
    optimizer_s: float

    def micro(self, b: int) -> float:
        return self.fixed_s + self.per_sample_s * b

    def backward(self, b: int) -> float:
        return self.backward_fixed_s + self.backward_per_sample_s * b


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares t = a + c * b."""
    mb = statistics.fmean(b for b, _ in points)
    mt = statistics.fmean(t for _, t in points)
    c = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    return max(0.0, mt - c * mb), c


def calibrate(repeats: int = 12, quantile: int = 2) -> Reference:
    """Time the work in this process, one thread: the `quantile`-th of 10 quantiles per size
    (the machine undisturbed, as far as one can tell on shared cores)."""
    import torch

    from autobatch.simulated import TensorMemory
    from autobatch.tiny_gpt import tiny_gpt_task

    torch.set_num_threads(1)
    task = tiny_gpt_task(**TASK_ARGS)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    memory = TensorMemory(model=model, optimizer=opt)
    total, backward, step = [], [], []
    for b in (1, 8, 24, 48):
        batch = task.batch(range(b))
        times = []
        for _ in range(repeats):
            with memory:
                t0 = time.perf_counter()
                loss = task.loss_fn(model, batch)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            times.append((t2 - t0, t2 - t1, t3 - t2))
        q = [statistics.quantiles(x, n=10)[quantile - 1] for x in zip(*times)]
        total.append((b, q[0]))
        backward.append((b, q[1]))
        step.append(q[2])
    return Reference(*_line(total), *_line(backward), optimizer_s=statistics.median(step))


def model_pacing(ref: Reference) -> Callable[[], None]:
    """A Ray worker set-up hook: simulated devices run on `ref`'s time model.

    It replaces `autobatch.simulated.Pacer` in the worker (the launcher's training
    loop and the probe) by one that sleeps until the modelled duration, instead of
    stretching the measured one by 1/speed: on these shared cores the same
    micro-step's real time varies by +-40% with the neighbours' load, and the
    product's Pacer multiplies that by 1/speed (x10 on the T4), which would measure
    the machine, not the plan (DESIGN.md: sleep for the difference between the
    modelled and the measured duration). The real work still runs; the optimizer
    step, the all-reduce, data loading and metrics are paid as they come."""

    def hook() -> None:
        import contextlib

        import autobatch.measure
        import autobatch.simulated
        import launcher.worker

        size: dict[str, int | None] = {"b": None}  # the probe's micro-batch in progress

        class ModelPacer:
            def __init__(self, speed: float, *, backward_factor: float = 3.0) -> None:
                self.speed, self.backward_factor, self.slept_s = speed, backward_factor, 0.0

            def _until(self, t0: float, seconds: float) -> None:
                delay = seconds - (time.perf_counter() - t0)
                if delay > 0:
                    time.sleep(delay)
                    self.slept_s += delay

            @contextlib.contextmanager
            def micro_step(self):  # noqa: ANN202  (the probe: a micro-step or the optimizer)
                b, t0 = size["b"], time.perf_counter()
                yield
                self._until(t0, (ref.micro(b) if b else ref.optimizer_s) / self.speed)

            def wrap_loss_fn(self, loss_fn):  # noqa: ANN001, ANN202  (training)
                def paced(model, batch):  # noqa: ANN001, ANN202
                    t0 = time.perf_counter()
                    loss = loss_fn(model, batch)
                    b = len(next(iter(batch.values())))
                    self._until(t0, ref.micro(b) / self.speed - ref.backward(b))
                    return loss

                return paced

            def attach(self, optimizer):  # noqa: ANN001, ANN202
                started: list[float] = []
                pre = optimizer.register_step_pre_hook(
                    lambda *_: started.append(time.perf_counter())
                )
                post = optimizer.register_step_post_hook(
                    lambda *_: self._until(started.pop(), ref.optimizer_s / self.speed)
                )

                def detach() -> None:
                    pre.remove()
                    post.remove()

                return detach

        runner_step = autobatch.measure.StepRunner._micro_step

        def probe_micro_step(self, b, weight):  # noqa: ANN001, ANN202
            size["b"] = b
            try:
                return runner_step(self, b, weight)
            finally:
                size["b"] = None

        autobatch.measure.StepRunner._micro_step = probe_micro_step
        autobatch.simulated.Pacer = autobatch.measure.Pacer = launcher.worker.Pacer = ModelPacer

    return hook


def absolute_speeds(devices: Sequence[SimulatedDevice]) -> list[SimulatedDevice]:
    """Speeds relative to this machine: divided by the fastest only when it exceeds 1.

    The runner divides by the job's fastest device (`normalise_speeds`), which makes a
    one-device job of a slow device run at full speed: the ideal could not be measured.
    """
    fastest = max([1.0, *(d.speed for d in devices)])
    return [replace(d, speed=d.speed / fastest) for d in devices]


def simulated_mix(speed_scale: float) -> list[dict]:
    """The mix's devices as job-spec entries: memory / 2560, speed by tensor peak."""
    top = GPU_SPECS[MIX[0]].fp16_flops
    return [
        {
            "name": "sim-" + name.split("-")[0].lower(),
            "memory": f"{GPU_SPECS[name].memory_bytes / MIB_PER_SIM_MIB / 2**20:.2f}MiB",
            "speed": round(speed_scale * GPU_SPECS[name].fp16_flops / top, 4),
        }
        for name in MIX
    ]


def run_job(tmp: str, name: str, sims: list[dict], planner: str, kind: str) -> Measured:
    steps, skip = STEPS[kind]
    spec = parse_spec(
        {
            "name": name,
            "task_args": TASK_ARGS,
            "global_batch_size": GLOBAL_BATCH,
            "max_steps": steps,
            "planner": planner,
            "devices": {"select": "simulated", "simulated": sims},
            "checkpoint": {"dir": f"{tmp}/{name}", "interval": 10_000, "resume": False},
        }
    )
    rec, load = _Recorder(skip), ForeignLoad()
    JobRunner(spec, runs_root=tmp, listener=rec).run()
    assert rec.plan is not None
    per_rank = [rec.per_rank(r) for r in range(rec.plan.world_size)]
    return Measured(
        label=name,
        samples_per_s=rec.samples_per_s(GLOBAL_BATCH),
        step_s=tuple(s for s, _ in per_rank),
        sync_s=tuple(w for _, w in per_rank),
        foreign_load=load.share(),
        plan=rec.plan,
    )


def measure(
    tmp: str, name: str, sims: list[dict], planner: str, kind: str, quiet: float
) -> Measured:
    """`run_job` once the CPU is quiet; a failed job is reported and run once more."""
    for attempt in (1, 2):
        ForeignLoad().wait_quiet(quiet)
        try:
            m = run_job(tmp, f"{name}-try{attempt}" if attempt > 1 else name, sims, planner, kind)
        except LaunchError as exc:
            print(f"  {name}: job failed ({exc}); " + ("again" if attempt == 1 else "giving up"))
            if attempt == 2:
                raise
            continue
        print_run(m)
        return m
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# reporting


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def print_run(m: Measured) -> None:
    ranks = ", ".join(
        f"{r.device_name} {'+'.join(map(str, r.micro_batches))}" for r in m.plan.ranks
    )
    waits = " ".join(_pct(m.sync_share(r)) for r in range(m.plan.world_size))
    print(
        f"  {m.label:<16} {m.samples_per_s:6.1f} samples/s (predicted "
        f"{m.plan.predicted_samples_per_s:6.1f}); sync wait/step {waits}; "
        f"others used {m.foreign_load:.0%} of the CPU; micro-batches [{ranks}]"
    )


def print_ranks(m: Measured) -> None:
    """Per rank of one plan run: predicted time, measured step, compute (step - wait)."""
    print(f"per rank ({m.label}): predicted time / measured step / measured step - sync wait")
    for r in m.plan.ranks:
        wait = m.sync_s[r.rank] or 0.0
        step = m.step_s[r.rank]
        print(
            f"  rank {r.rank} {r.device_name:<9} {r.samples:>3} samples in {r.accumulation_steps}"
            f" micro-steps: {r.predicted_time_s * 1e3:6.0f} / {step * 1e3:6.0f} / "
            f"{(step - wait) * 1e3:6.0f} ms; sync wait {_pct(wait / step)}"
        )


def summarise(plans: list[Measured], equals: list[Measured], alone: list[Measured]) -> None:
    a = statistics.median(m.samples_per_s for m in plans)
    b = statistics.median(m.samples_per_s for m in equals)
    c = sum(m.samples_per_s for m in alone)
    pred = plans[0].plan
    pred_c = sum(m.plan.predicted_samples_per_s for m in alone)
    worst = {
        r.device_name: max(m.sync_share(r.rank) or 0.0 for m in plans) for r in pred.ranks
    }  # the worst repeat, per device
    print(
        f"\nRESULT (median of {len(plans)} run(s)): plan {a:.1f} samples/s, equal split {b:.1f}, "
        f"ideal {c:.1f} (= {' + '.join(f'{m.samples_per_s:.1f}' for m in alone)})"
    )
    print(f"efficiency a/c = {a / c:.3f}; speedup a/b = {a / b:.2f}x")
    print(
        "sync wait / step time, worst run: "
        + ", ".join(f"{name} {share:.1%}" for name, share in worst.items())
    )
    print(
        f"goals: efficiency >= 0.9 {'met' if a / c >= 0.9 else 'NOT met'}; sync wait <= 5% "
        f"on every rank {'met' if max(worst.values()) <= 0.05 else 'NOT met'}"
    )
    print(
        f"where the gap to the ideal comes from: efficiency {a / c:.3f} = planner-predicted "
        f"{pred.predicted_samples_per_s / pred_c:.3f} (the time models' cost of splitting "
        f"one step: per-micro-step and per-step costs paid on every rank) x plan run "
        f"{a / pred.predicted_samples_per_s:.3f} of its prediction x ideal "
        f"{pred_c / c:.3f} of its prediction (inverse)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of (a) and (b)")
    parser.add_argument("--speed-scale", type=float, default=0.25, help="the A100's speed")
    parser.add_argument("--quiet-wait", type=float, default=15.0, help="max s to wait per job")
    parser.add_argument(
        "--product-pacer",
        action="store_true",
        help="simulate speeds with autobatch.simulated.Pacer (measured time x 1/speed)",
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when redirected to a file
    sims = simulated_mix(args.speed_scale)
    print(
        f"model: tiny GPT {TASK_ARGS}, global batch {GLOBAL_BATCH}, AdamW fp32; devices: "
        + ", ".join(f"{s['name']} {s['memory']} speed {s['speed']}" for s in sims)
        + f"; {'product Pacer' if args.product_pacer else 'modelled device time'}"
    )
    launcher.runner.normalise_speeds = absolute_speeds  # see the module docstring
    os.environ.setdefault("RAY_worker_niceness", "0")
    t0, quiet = time.monotonic(), args.quiet_wait
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AUTOBATCH_PROFILE_CACHE"] = f"{tmp}/profiles"  # measured afresh, once
        env = {}
        if not args.product_pacer:
            ref = calibrate()
            print(
                f"reference (this machine, 1 thread): micro-step {ref.fixed_s * 1e3:.1f} ms + "
                f"{ref.per_sample_s * 1e3:.2f} ms/sample (backward {ref.backward_fixed_s * 1e3:.1f}"
                f" + {ref.backward_per_sample_s * 1e3:.2f}), optimizer {ref.optimizer_s * 1e3:.1f}"
                " ms; a device of speed s takes these / s"
            )
            env = {"worker_process_setup_hook": model_pacing(ref)}
        ray.init(num_cpus=8, include_dashboard=False, runtime_env=env)
        try:
            plans, equals, alone = [], [], []
            for i in range(args.repeats):
                plans.append(measure(tmp, f"optimal-{i}", sims, "optimal", "optimal", quiet))
                equals.append(measure(tmp, f"equal-{i}", sims, "equal_split", "equal_split", quiet))
                if i == 0:
                    for s in sims:
                        name = f"alone-{s['name']}"
                        alone.append(measure(tmp, name, [s], "optimal", "alone", quiet))
        finally:
            ray.shutdown()
    print_ranks(sorted(plans, key=lambda m: m.samples_per_s)[len(plans) // 2])
    summarise(plans, equals, alone)
    print(f"wall time {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
