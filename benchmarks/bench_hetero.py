"""The heterogeneity win, measured: autobatch's plan vs the equal split vs the ideal.

    .venv/bin/python benchmarks/bench_hetero.py [--repeats 2] [--speed-scale 0.25]
                                                [--global-batch 128]

The launcher on a local Ray trains the demo model (configs/demo.yaml: tiny GPT,
seq_len 64, global batch 128, AdamW, fp32) on three simulated devices whose
memory and speed ratios are those of an A100-80GB, an L4-24GB and a T4-16GB
(autobatch.probe.estimate.GPU_SPECS: memory in MiB / 2560; speed proportional to the
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
all-reduce) as a share of the step time. (a) and (b) run `--repeats`
times, interleaved, and the medians are printed; (c) runs once per device. Then
it splits the gap to the ideal into what the planner predicted from the measured
profiles (the cost of splitting one step over three devices) and what the runs
added on top of the prediction.

Measuring on 2 shared cores (see docs/measuring.md): every worker runs one thread at
the default niceness (Ray's workers otherwise run at nice 15 and lose the CPU to
anything else). A simulated device's time is MODELLED: the script first times
the demo model's work in this process (forward+backward per micro-batch size,
the optimizer step; the minimum of 20 rounds, fitted to lines), and in every
Ray worker a set-up hook replaces `autobatch.probe.simulated.Pacer` by one that runs
the work for real and then sleeps until reference / speed (`model_pacing`). The
product's Pacer instead stretches the measured time by 1/speed, which on these
shared cores multiplies the neighbours' load into the device's speed (x10 on
the T4; run it with --product-pacer). All speeds are <= --speed-scale (0.25), so
the real work needs a quarter of the modelled time or less and the modelled
time dominates even when the cores are shared. The optimizer step is modelled
the same way; the all-reduce, DDP's bucket copies, data loading and metrics run
at their real cost. Speeds are relative to this machine (the runner caps them at
1, see `normalise_speeds`), so a device alone runs at the speed it has in the
mix. Profiles are measured once, in the first
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
from dataclasses import dataclass, field

import hetero_sim  # benchmarks/hetero_sim.py, next to this script
import ray
from hetero_sim import ForeignLoad, calibrate, worker_setup

from autobatch.errors import LaunchError
from autobatch.planning.plan import Plan
from autobatch.probe.estimate import GPU_SPECS
from launcher.job.controller import JobController
from launcher.job.events import Planned, Progress, RunnerEvent
from launcher.job.spec import parse_spec

MIX = ("A100-80GB", "L4-24GB", "T4-16GB")
MIB_PER_SIM_MIB = 2560  # an 80 GiB GPU becomes a 32 MiB simulated device
TASK_ARGS = {"dataset_size": 8192, "seq_len": 64}  # the demo's model and data (configs/demo.yaml)
GLOBAL_BATCH = 128  # the demo's; --global-batch changes it
# (optimizer steps, steps left out of the steady state) per kind of job: long enough for a
# steady state, short enough for ~5 minutes (a T4 alone takes ~6 s per step).
STEPS = {"optimal": (16, 2), "equal_split": (6, 2), "alone": (4, 1)}


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

    def __call__(self, event: RunnerEvent) -> None:
        if isinstance(event, Planned):
            self.plan = event.plan
        if not isinstance(event, Progress):
            return
        for s in event.snapshots:
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
    JobController(spec, runs_root=tmp, listener=rec).run()
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
    print(
        f"per rank ({m.label}): predicted time / measured step / measured step - sync wait; "
        "sync wait measured (predicted: the plan's own idle time)"
    )
    for r in m.plan.ranks:
        wait = m.sync_s[r.rank] or 0.0
        step = m.step_s[r.rank]
        idle = 1 - r.predicted_time_s / m.plan.predicted_step_time_s
        print(
            f"  rank {r.rank} {r.device_name:<9} {r.samples:>3} samples in {r.accumulation_steps}"
            f" micro-steps: {r.predicted_time_s * 1e3:6.0f} / {step * 1e3:6.0f} / "
            f"{(step - wait) * 1e3:6.0f} ms; sync wait {_pct(wait / step)} ({idle:.1%})"
        )


def worst_sync(runs: list[Measured]) -> dict[str, float]:
    """Per device, the largest sync-wait share of its runs."""
    plan = runs[0].plan
    return {r.device_name: max(m.sync_share(r.rank) or 0.0 for m in runs) for r in plan.ranks}


def summarise(runs: dict[str, list[Measured]]) -> None:
    a, b = (statistics.median(m.samples_per_s for m in runs[k]) for k in ("plan", "equal"))
    c = sum(m.samples_per_s for m in runs["alone"])
    plan = runs["plan"][0].plan
    pred_c = sum(m.plan.predicted_samples_per_s for m in runs["alone"])
    waits = worst_sync(runs["plan"])
    print(
        f"\nRESULT (median of {len(runs['plan'])} run(s)): plan {a:.1f} samples/s, equal split "
        f"{b:.1f}, ideal {c:.1f} (= {' + '.join(f'{m.samples_per_s:.1f}' for m in runs['alone'])})"
    )
    print(f"efficiency a/c = {a / c:.3f}; speedup a/b = {a / b:.2f}x")
    print(
        "sync wait / step time, worst run: "
        + ", ".join(f"{name} {share:.1%}" for name, share in waits.items())
    )
    print(
        f"goals: efficiency >= 0.9 {'met' if a / c >= 0.9 else 'NOT met'}; sync wait <= 5% on "
        f"every rank {'met' if max(waits.values()) <= 0.05 else 'NOT met'}"
    )
    pred = plan.predicted_samples_per_s
    print(
        f"where the gap to the ideal comes from: efficiency {a / c:.3f} = planner-predicted "
        f"{pred / pred_c:.3f} (the time models' cost of splitting one step: each rank pays its "
        f"per-micro-step and per-step costs on a share of the batch) x plan run "
        f"{a / pred:.3f} of its prediction x ideal {pred_c / c:.3f} of its prediction (inverse)"
    )


def main() -> None:
    global GLOBAL_BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of (a) and (b)")
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--speed-scale", type=float, default=0.25, help="the A100's speed")
    parser.add_argument("--quiet-wait", type=float, default=15.0, help="max s to wait per job")
    parser.add_argument(
        "--product-pacer",
        action="store_true",
        help="simulate speeds with autobatch.probe.simulated.Pacer (measured time x 1/speed)",
    )
    args = parser.parse_args()
    GLOBAL_BATCH = args.global_batch
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when redirected to a file
    sims = simulated_mix(args.speed_scale)
    print(
        f"model: tiny GPT {TASK_ARGS}, global batch {GLOBAL_BATCH}, AdamW fp32; devices: "
        + ", ".join(f"{s['name']} {s['memory']} speed {s['speed']}" for s in sims)
        + f"; {'product Pacer' if args.product_pacer else 'modelled device time'}"
    )
    os.environ.setdefault("RAY_worker_niceness", "0")
    t0, quiet = time.monotonic(), args.quiet_wait
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AUTOBATCH_PROFILE_CACHE"] = f"{tmp}/profiles"  # measured afresh, once
        ref = None
        if not args.product_pacer:
            ref = calibrate(TASK_ARGS)
            print(
                f"reference (this machine, 1 thread): micro-step {ref.fixed_s * 1e3:.1f} ms + "
                f"{ref.per_sample_s * 1e3:.2f} ms/sample (backward {ref.backward_fixed_s * 1e3:.1f}"
                f" + {ref.backward_per_sample_s * 1e3:.2f}), optimizer {ref.optimizer_s * 1e3:.1f}"
                " ms; a device of speed s takes these / s"
            )
        ray.cloudpickle.register_pickle_by_value(hetero_sim)  # workers lack benchmarks/
        hook = worker_setup(ref)
        ray.init(
            address="local",  # a fresh Ray, never one that `ray start` recorded here
            num_cpus=8,
            include_dashboard=False,
            runtime_env={"worker_process_setup_hook": hook},
        )
        try:
            runs: dict[str, list[Measured]] = {k: [] for k in ("plan", "equal", "alone")}
            for i in range(args.repeats):
                runs["plan"].append(measure(tmp, f"plan-{i}", sims, "optimal", "optimal", quiet))
                runs["equal"].append(
                    measure(tmp, f"equal-{i}", sims, "equal_split", "equal_split", quiet)
                )
                if i == 0:
                    for s in sims:
                        name = f"alone-{s['name']}"
                        runs["alone"].append(measure(tmp, name, [s], "optimal", "alone", quiet))
        finally:
            ray.shutdown()
    print_ranks(sorted(runs["plan"], key=lambda m: m.samples_per_s)[len(runs["plan"]) // 2])
    summarise(runs)
    print(f"wall time {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
