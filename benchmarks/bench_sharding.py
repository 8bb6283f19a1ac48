"""Sharding as a memory lever, measured: the largest model each mode trains on 3 mixed devices.

    .venv/bin/python benchmarks/bench_sharding.py [--steps 6] [--speed-scale 0.5]
        [--retries 2] [--max-layers 64] [--max-layers-carried 256] [--search-only]
        [--proportional-only] [--what-if-only]

Three simulated devices of 48, 20 and 12 MiB, speeds 1 : 0.5 : 0.25 (times
--speed-scale, as in bench_hetero), all three kept (`devices.keep_all`: the goals are
"on 3 ranks"); AdamW, fp32, global batch 32. The model is the tiny GPT (d_model 64, 4
heads, seq_len 16, vocab 64) with more and more layers: parameters and optimizer state
grow with the layers, a sharding unit (one block) stays the same size.

1. Search, in this process: for a number of layers, every device is probed as the
   launcher's worker probes it (`launcher.job.worker.probe`: the device's memory, 5%
   headroom, DDP's gradient buckets reserved, gradient checkpointing where micro-batch 1
   does not fit without it); a device where not one sample of a replica fits gets the
   fastest measured device's profile carried over (`ModelProfile.carried_to`, as the
   runner's `_carry_profiles`; not for `none`, as in the runner); then
   `make_sharded_plan(32, ..., mode, keep_all=True)`. The layers double until no mode
   plans, then each mode's largest is bisected (assuming that a mode which does not plan
   at n layers does not plan at more). Probing runs at the machine's speed here (what
   fits does not depend on speed), and skips a device when a larger one did not fit one
   sample (the runner probes it, to the same end).
2. Each mode's largest model trains in that mode through the launcher (JobController on a
   local Ray, `--steps` steps). If the job fails (the simulated device runs out of
   memory where the plan said it fits: the runner gives up at micro-batch 1), smaller
   sizes are bisected, at most --retries more jobs, from a size known to train. Per rank:
   the measured peak (the simulated device's TensorMemory, each step's; the maximum over
   the steps) against the plan's predicted peak (for `none` plus DDP's gradient buckets:
   the plan holds them in its reserve, the simulated device counts them once DDP rebuilds
   them inside a step); out-of-memory events and restarts (a rank enforces its device's
   memory from its third step); samples/s (steady state: rank 0's snapshots after the
   first 2 steps) against the plan's prediction and its ideal (the sum of each device's
   best alone at the plan's world size, predicted from the probe's time models: a device
   alone cannot hold a model that fits only sharded). Exactness: every global batch (the
   ranks' audit of dataset indices against the sampler), and the sharded modes'
   parameters against a one-device job of the same spec on a 512 MiB device.
3. bench_hetero's efficiency with each mode: the largest model of `none` (it trains in
   every mode) in the sharded modes too, and on each device alone (one one-device job
   each; alone, every mode is a replica): efficiency = measured samples/s / the sum of
   the devices' samples/s alone. The sharded runs' parameters against the replicated
   run's.

4. `proportional` past the probe. Part 1 probes as the launcher's worker does, which
   measures a replica on each device (the others get that profile carried over); a
   replica fits sim-a100 at 40 layers, not at 48, below what proportional sharding
   holds. (The launcher then measures a replica on the host CPU instead: part 1's
   search does not.) So this part probes each
   size on the reference device (512 MiB: a replica fits), carries that profile to the
   three devices as the runner carries one (`ModelProfile.carried_to`: their memory,
   headroom and speed), and plans "full" and "proportional" on them (`keep_all`):
   doubled from 16 layers, then bisected per mode
   (full's largest matches part 1's, from the devices' own probes). Proportional's
   largest then trains through the library, not the launcher: 3 gloo ranks
   (torch.multiprocessing), `wrapping_for("proportional", slices=plan.state_slices)`,
   the plan's micro-batches from `GlobalBatchSampler`, AdamW and clipping as the job
   spec says, each rank's simulated memory enforced by `TensorMemory` from the first
   step (peak measured against the plan's prediction); an out-of-memory bisects smaller
   sizes (--retries). Its parameters are compared with one process that takes each
   global batch whole, beside float32's own noise on the same model: one process taking
   micro-batches of 4 against the whole batch. `--proportional-only` skips parts 1's
   training, 2 and 3 (the search of part 1 still runs: none's and full's sizes).
5. `proportional` against `full` in samples/s, at the largest model full plans on the
   carried figures: both through the library as in part 4, each rank paced to its
   device's speed (1 : 0.5 : 0.25, `Pacer`), twice each in alternation.
6. The what-if on GPUs not here: `autobatch plan configs/whatif-llama-8b.yaml --what-if
   --devices 2xA100-80GB,4xT4-16GB --json` (a subprocess, estimates from the model's
   config.json): the lever combinations only `proportional` fits, with its state shares.
   `--what-if-only` runs this part alone (seconds).

Parameters are compared as tests/test_sharding.py does: float32, per tensor
||a - b|| / ||b||, the largest over the tensors, <= 1e-5 (the largest element's
difference is printed too: Adam turns float32 rounding in a near-zero gradient element
into a step of up to lr). Each device's time is modelled as in bench_hetero
(benchmarks/hetero_sim.py: this process times the model's work, then each device
sleeps until that / speed), once per model size, so each size trains in a Ray session
of its own. The fixed cost of a micro-step (tens of ms) is mostly the simulated
device's memory accounting (one Python call per op), and it counts as device time.
Other processes on the machine disturb the timings: each job prints their share of
the CPU. The goals (the issue's): with AdamW fp32 on 3 ranks, `full` trains >= 2.5x
the parameters of `none`, `optimizer` >= 1.4x; no OOM after the probe; exact global
batches and parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import hetero_sim  # benchmarks/hetero_sim.py, next to this script
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hetero_sim import ForeignLoad, calibrate, worker_setup
from ledger import exact_global_batches  # benchmarks/ledger.py

from autobatch.errors import LaunchError, NoFitError, PlanError
from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.plan import Plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.planning.sharded import make_sharded_plan
from autobatch.probe.devices import SimulatedDevice, parse_memory
from autobatch.probe.profile import ModelProfile
from autobatch.probe.simulated import Pacer, TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.step.wrap import REPLICATED, wrapping_for
from launcher.job.collector import SnapshotCollector
from launcher.job.controller import JobController
from launcher.job.events import JobSummary
from launcher.job.optim import build_optimizer
from launcher.job.spec import parse_spec
from launcher.job.tasks import load_task
from launcher.job.worker import probe

MODES = ("none", "optimizer", "full")
PAIR = ("full", "proportional")  # part 4's and 5's modes
DEVICES = (("sim-a100", "48MiB", 1.0), ("sim-l4", "20MiB", 0.5), ("sim-t4", "12MiB", 0.25))
REFERENCE_DEVICE = {"name": "sim-ref", "memory": "512MiB", "speed": 1.0}  # any size fits
MODEL = {"dataset_size": 2048, "vocab_size": 64, "seq_len": 16, "d_model": 64, "n_heads": 4}
GLOBAL_BATCH = 32
GOALS = {"optimizer": 1.4, "full": 2.5}  # x the parameters of `none`
SKIP = 2  # steps left out of the steady state (and before the memory limit is enforced)
ALONE = (3, 1)  # (steps, skipped) of a one-device job for the ideal
TOLERANCE = 1e-5  # parameters: max |a - b| / max |b| per tensor


def job_spec(name: str, layers: int, mode: str, sims: list[dict], steps: int, tmp: str) -> dict:
    return {
        "name": name,
        "task_args": {**MODEL, "n_layers": layers},
        "global_batch_size": GLOBAL_BATCH,
        "max_steps": steps,
        "optimizer": {"name": "adamw", "lr": 0.002, "max_grad_norm": 1.0},
        "precision": "fp32",
        "sharding": mode,
        "devices": {"select": "simulated", "keep_all": True, "simulated": sims},
        "checkpoint": {"dir": f"{tmp}/{name}", "interval": 10_000, "resume": False},
        "audit_samples": True,
        "seed": 0,
    }


def simulated(speed_scale: float) -> list[dict]:
    return [
        {"name": name, "memory": memory, "speed": round(speed * speed_scale, 4)}
        for name, memory, speed in DEVICES
    ]


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------
# 1. the search: probe and plan, no training


@dataclass(frozen=True)
class Size:
    """One model size, probed on every device and planned in every mode."""

    layers: int
    params: int
    state_bytes: int  # a replica's parameters, gradients and optimizer state (AdamW: 16 B each)
    replica_micro_batch: tuple[int, ...]  # per device, a replica's largest (0: not one sample)
    notes: tuple[str, ...]  # devices carried over or checkpointed
    plans: dict[str, Plan | str]  # per mode, the plan or why there is none

    def plans_in(self, mode: str) -> bool:
        return isinstance(self.plans[mode], Plan)

    def row(self) -> str:
        cells = []
        for mode in MODES:
            plan = self.plans[mode]
            limits = "-"
            if isinstance(plan, Plan):
                limits = "/".join(str(r.max_micro_batch) for r in plan.ranks)
            cells.append(f"{mode} {limits:<9}")
        notes = f"  ({'; '.join(self.notes)})" if self.notes else ""
        return (
            f"  {self.layers:>3} layers {self.params / 1e6:6.3f} M params, replica state "
            f"{_mib(self.state_bytes):>9}; replica micro-batch "
            f"{'/'.join(map(str, self.replica_micro_batch)):<10} {'  '.join(cells)}{notes}"
        )


def probe_size(layers: int, cache_dir: str) -> Size:
    """Probe every device as the launcher does, carry profiles as its runner does, plan."""
    sims = [{"name": n, "memory": m, "speed": 1.0} for n, m, _ in DEVICES]
    spec = parse_spec(job_spec("search", layers, "none", sims, 1, cache_dir))
    task = load_task(spec)
    with torch.device("meta"):
        model = task.build_model()
    params = sum(p.numel() for p in model.parameters())
    found: dict[str, ModelProfile | str] = {}
    for i, (name, memory, _) in enumerate(DEVICES):  # largest memory first
        info = SimulatedDevice(name, parse_memory(memory), 1.0).info(i)
        if any(isinstance(p, str) for p in found.values()):  # a larger device could not
            found[name] = "a larger device does not fit one sample"
            continue
        try:
            found[name] = probe(spec, "fp32", info, cache_dir)
        except NoFitError as exc:
            found[name] = str(exc)
    replica = tuple(p.max_micro_batch if isinstance(p, ModelProfile) else 0 for p in found.values())
    notes = [
        f"{n} checkpointed" for n, p in found.items() if getattr(p, "gradient_checkpointing", 0)
    ]
    measured = [d for d in DEVICES if isinstance(found[d[0]], ModelProfile)]
    if not measured:
        why = "no device fits one sample of a replica: nothing to probe, nothing to carry"
        return Size(layers, params, 16 * params, replica, (), dict.fromkeys(MODES, why))
    src = max(measured, key=lambda d: d[2])  # the fastest measured device, as the runner
    unfit = [d for d in DEVICES if isinstance(found[d[0]], str)]
    plans: dict[str, Plan | str] = {}
    if unfit:  # `none`: the runner carries nothing; keep_all fails
        plans["none"] = f"a replica does not fit {', '.join(d[0] for d in unfit)}"
    for name, memory, _ in unfit:
        info = SimulatedDevice(name, parse_memory(memory), 1.0).info()
        found[name] = found[src[0]].carried_to(info, headroom_fraction=0.05, time_scale=1.0)
        notes.append(f"{name} carried from {src[0]}")
    capacities = [found[name].capacity(f"dev{i}", name) for i, (name, _, _) in enumerate(DEVICES)]
    for mode in MODES:
        if mode in plans:
            continue
        try:
            plans[mode] = make_sharded_plan(GLOBAL_BATCH, capacities, mode, keep_all=True)
        except PlanError as exc:
            plans[mode] = str(exc)
    state = found[src[0]].state
    return Size(layers, params, state.total_bytes, replica, tuple(notes), plans)


def search(max_layers: int, cache_dir: str) -> dict[str, Size]:
    """Each mode's largest size that plans: the layers doubled until no mode plans (or past
    `max_layers`), then bisected per mode."""
    seen: dict[int, Size] = {}

    def at(layers: int) -> Size:
        if layers not in seen:
            seen[layers] = probe_size(layers, cache_dir)
            print(seen[layers].row(), flush=True)
        return seen[layers]

    layers = 1
    while layers <= max_layers and any(at(layers).plans_in(m) for m in MODES):
        layers *= 2
    best: dict[str, Size] = {}
    for mode in MODES:
        fits = [n for n, s in seen.items() if s.plans_in(mode)]
        if not fits:
            raise SystemExit(f"{mode} plans no size, not even 1 layer: {seen[1].plans[mode]}")
        lo = max(fits)
        hi = min([n for n, s in seen.items() if n > lo and not s.plans_in(mode)] or [lo])
        if hi == lo:
            print(f"  {mode} still plans at {lo} layers: raise --max-layers for its largest")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if at(mid).plans_in(mode) else (lo, mid)
        best[mode] = seen[lo]
    return best


# ---------------------------------------------------------------------------
# 2. training through the launcher


@dataclass(frozen=True)
class Run:
    """One job through the launcher: its summary, every rank's snapshot of every step."""

    label: str
    summary: JobSummary
    snapshots: tuple[RankSnapshot, ...]
    samples_per_s: float
    foreign_load: float
    exact_batches: bool

    @property
    def plan(self) -> Plan:
        return self.summary.plan

    @property
    def ideal(self) -> float:
        return self.plan.ideal_samples_per_s

    def peaks(self) -> list[tuple[int, int | None, int | None, int | None]]:
        """Per rank: (rank, measured peak (max over steps), predicted peak, device memory).
        Replicas: the prediction plus DDP's gradient buckets, which the plan holds apart
        (its reserve) and the simulated device counts once DDP rebuilds them in a step."""
        out = []
        for r in range(self.plan.world_size):
            mine = [s for s in self.snapshots if s.rank == r]
            measured = [s.torch_memory_peak_bytes for s in mine if s.torch_memory_peak_bytes]
            predicted = next((s.plan_predicted_peak_bytes for s in mine), None)
            memory = self.plan.capacity(r).memory
            if predicted is not None and self.plan.sharding == "none" and memory is not None:
                predicted += memory.replica_reserve_bytes
            total = next((s.device_memory_total_bytes for s in mine), None)
            out.append((r, max(measured, default=None), predicted, total))
        return out

    def no_oom(self) -> bool:
        within = all(m is not None and t is not None and m <= t for _, m, _, t in self.peaks())
        return self.summary.oom_events == 0 and self.summary.restarts == 0 and within


def steady_samples_per_s(snapshots: list[RankSnapshot], skip: int) -> float:
    stamps = {s.optimizer_steps_total: s.timestamp_s for s in snapshots if s.rank == 0}
    steps = sorted(k for k in stamps if k >= skip)
    if len(steps) < 2:
        raise RuntimeError(f"too few steady-state steps: {sorted(stamps)}")
    first, last = steps[0], steps[-1]
    return GLOBAL_BATCH * (last - first) / (stamps[last] - stamps[first])


def train(tmp: str, spec: dict, skip: int, quiet_s: float) -> Run:
    """One job; every snapshot kept (a collector the runner does not own, drained after)."""
    ForeignLoad().wait_quiet(quiet_s)
    load = ForeignLoad()
    collector = SnapshotCollector.remote(None)  # no server: it keeps snapshots for drain
    try:
        runner = JobController(parse_spec(spec), runs_root=tmp, collector_factory=lambda: collector)
        summary = runner.run()
        snapshots = ray.get(collector.drain.remote())
    finally:
        ray.kill(collector)
    return Run(
        label=spec["name"],
        summary=summary,
        snapshots=tuple(snapshots),
        samples_per_s=steady_samples_per_s(snapshots, skip),
        foreign_load=load.share(),
        exact_batches=exact_global_batches(
            spec["checkpoint"]["dir"],
            MODEL["dataset_size"],
            GLOBAL_BATCH,
            spec["seed"],
            spec["max_steps"],
        ),
    )


def differences(got: dict, want: dict) -> tuple[float, float]:
    """(the largest per-tensor ||a - b|| / ||b||, the criterion of tests/test_sharding.py;
    the largest per-tensor max |a - b| / max |b|, where Adam can turn float32 rounding in a
    near-zero gradient element into a step of up to lr)."""
    if got.keys() != want.keys():
        return math.inf, math.inf
    norm = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    element = max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
    return norm, element


@contextlib.contextmanager
def devices_for(layers: int) -> Iterator[None]:
    """A Ray session whose workers model the devices' time on this model size's work."""
    ref = calibrate({**MODEL, "n_layers": layers}, repeats=6)
    print(
        f"  device time model, {layers} layers (this machine, 1 thread): micro-step "
        f"{ref.fixed_s * 1e3:.1f} ms + {ref.per_sample_s * 1e3:.2f} ms/sample, optimizer "
        f"{ref.optimizer_s * 1e3:.1f} ms; a device of speed s takes these / s"
    )
    ray.cloudpickle.register_pickle_by_value(hetero_sim)  # workers lack benchmarks/
    ray.init(
        address="local",  # a fresh Ray, never one that `ray start` recorded here
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": worker_setup(ref)},
    )
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class Largest:
    """A mode's largest model through the launcher: the run at the largest size that
    trained, and the sizes that ran out of memory (layers -> the launcher's error)."""

    mode: str
    layers: int = 0
    params: int = 0
    run: Run | None = None
    versus: str = ""  # what its parameters are compared with
    difference: tuple[float, float] = (0.0, 0.0)
    failed: dict[int, str] = field(default_factory=dict)


def train_largest(
    tmp: str,
    mode: str,
    planned: Size,
    trained_at: int,
    sims: list[dict],
    args: argparse.Namespace,
    then: Callable[[Run, int], None] | None = None,
) -> Largest:
    """The largest model that plans in `mode`, trained in it; when it fails (out of memory),
    smaller ones, bisected above `trained_at` layers (known to train), --retries at most.
    `then(run, layers)` runs in the same Ray session after a run that trained."""
    out = Largest(mode)
    lo, hi, layers = trained_at, planned.layers + 1, planned.layers
    for _ in range(1 + args.retries):
        why = "the largest that plans" if layers == planned.layers else "smaller, bisected"
        print(f"train {mode}: {layers} layers ({why}), sharding {mode}")
        with devices_for(layers):
            spec = job_spec(f"{mode}-{layers}", layers, mode, sims, args.steps, tmp)
            try:
                run = train(tmp, spec, SKIP, args.quiet_wait)
            except LaunchError as exc:
                out.failed[layers] = str(exc)
                print(f"  {mode}-{layers}: FAILED: {exc}")
                hi = layers
            else:
                out.layers, out.params, out.run, lo = layers, count_params(layers), run, layers
                if mode != "none":  # the replicated run of this size cannot hold it
                    name = f"{mode}-{layers}-one-device"
                    one = job_spec(name, layers, "none", [REFERENCE_DEVICE], args.steps, tmp)
                    reference = train(tmp, one, 1, args.quiet_wait)
                    out.versus = "one device"
                    out.difference = differences(
                        run.summary.parameters, reference.summary.parameters
                    )
                print_run(run, out.versus, out.difference)
                if then is not None:
                    then(run, layers)
        if hi - lo <= 1:
            break
        layers = (lo + hi) // 2
    return out


def count_params(layers: int) -> int:
    sims = [{"name": n, "memory": m} for n, m, _ in DEVICES]
    task = load_task(parse_spec(job_spec("count", layers, "none", sims, 1, "/tmp")))
    with torch.device("meta"):
        return sum(p.numel() for p in task.build_model().parameters())


def each_mode_and_alone(
    tmp: str, replicated: Run, layers: int, sims: list[dict], args: argparse.Namespace
) -> tuple[dict[str, Run], dict[str, tuple[float, float]], list[Run]]:
    """bench_hetero's efficiency with each mode: the model of `replicated` in the sharded
    modes (parameters against the replicated run's), and on each device alone."""
    print(f"bench_hetero's efficiency with each mode: {layers} layers in every mode, and alone")
    same, diffs = {"none": replicated}, {}
    for mode in MODES[1:]:
        spec = job_spec(f"same-{mode}-{layers}", layers, mode, sims, args.steps, tmp)
        same[mode] = run = train(tmp, spec, SKIP, args.quiet_wait)
        diffs[mode] = differences(run.summary.parameters, replicated.summary.parameters)
        print_run(run, "the replicated run", diffs[mode])
    alone = []
    for s in sims:
        spec = job_spec(f"alone-{s['name']}", layers, "none", [s], ALONE[0], tmp)
        alone.append(train(tmp, spec, ALONE[1], args.quiet_wait))
        print(f"  {s['name']} alone: {alone[-1].samples_per_s:.1f} samples/s")
    return same, diffs, alone


# ---------------------------------------------------------------------------
# 4. past the probe: proportional against full on figures carried from a large device


def carried_capacities(layers: int, cache_dir: str) -> list[DeviceCapacity]:
    """The model probed on the reference device (a replica fits there), its profile carried
    to each of the three devices as the runner carries it to a device a replica does not
    fit (`ModelProfile.carried_to`): their memory, their speed."""
    spec = parse_spec(job_spec("ref", layers, "none", [REFERENCE_DEVICE], 1, cache_dir))
    ref = SimulatedDevice("sim-ref", parse_memory(REFERENCE_DEVICE["memory"]), 1.0)
    profile = probe(spec, "fp32", ref.info(0), cache_dir)
    caps = []
    for i, (name, memory, speed) in enumerate(DEVICES):
        info = SimulatedDevice(name, parse_memory(memory), speed).info(i)
        carried = profile.carried_to(
            info, headroom_fraction=spec.memory_headroom, time_scale=1.0 / speed
        )
        caps.append(carried.capacity(f"dev{i}", name))
    return caps


def carried_search(low: int, max_layers: int, cache_dir: str) -> dict[str, tuple[int, Plan]]:
    """Per mode ("full", "proportional"), the largest layer count that plans on the carried
    figures (`keep_all`): doubled from `low` (which plans in both), then bisected."""
    plans: dict[int, dict[str, Plan | str]] = {}

    def at(layers: int) -> dict[str, Plan | str]:
        if layers not in plans:
            caps = carried_capacities(layers, cache_dir)
            plans[layers] = {}
            for mode in PAIR:
                try:
                    plans[layers][mode] = make_sharded_plan(GLOBAL_BATCH, caps, mode, keep_all=True)
                except PlanError as exc:
                    plans[layers][mode] = str(exc)
            cells = [
                f"{m} " + ("/".join(str(r.max_micro_batch) for r in p.ranks)
                           if isinstance(p, Plan) else "-")
                for m, p in plans[layers].items()
            ]  # fmt: skip
            print(f"  {layers:>3} layers {count_params(layers) / 1e6:6.3f} M  {'  '.join(cells)}")
        return plans[layers]

    best = {}
    for mode in PAIR:
        lo, hi = low, low
        while hi <= max_layers and isinstance(at(hi)[mode], Plan):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if isinstance(at(mid)[mode], Plan) else (lo, mid)
        best[mode] = (lo, at(lo)[mode])
    return best


@dataclass(frozen=True)
class LibraryRun:
    """3 gloo ranks trained through the library (no launcher), each rank's simulated memory
    enforced from the first step: per rank its measured peak (the max over the steps)."""

    layers: int
    plan: Plan
    peaks: tuple[int, ...]
    oom: tuple[str, ...]  # per rank: '' or the out-of-memory error
    difference: tuple[float, float]  # parameters vs one process, whole batch
    noise: tuple[float, float]  # one process in micro-batches of 4 vs whole: float32 alone
    seconds: float
    step_s: tuple[float, ...]  # rank 0's wall time of each step

    @property
    def samples_per_s(self) -> float:
        """Steady state: the steps after the first SKIP."""
        return GLOBAL_BATCH * len(self.step_s[SKIP:]) / sum(self.step_s[SKIP:])


def _library_rank(rank: int, world: int, port: int, layers: int, plan: Plan, steps: int,
                  out_dir: str, speeds: tuple[float, ...] | None) -> None:  # fmt: skip
    """One rank: the plan's micro-batches and sharding (`Proportional` with its slices),
    AdamW with clipping as the job spec says, the device's memory enforced by
    `TensorMemory`; with `speeds`, the rank's device paced to its speed (`Pacer`)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    spec = parse_spec(job_spec("lib", layers, plan.sharding, simulated(1.0), steps, out_dir))
    task = load_task(spec)
    torch.manual_seed(spec.seed)
    model = task.build_model()
    if plan.capacity(rank).gradient_checkpointing:
        task.checkpoint_activations(model)
    wrapping = wrapping_for(plan.sharding, slices=plan.state_slices)
    wrapped = wrapping.wrap(model, torch.device("cpu"))
    optimizer = build_optimizer(spec.optimizer)(wrapped)
    loss_fn = task.loss_fn
    if speeds is not None:
        pacer = Pacer(speeds[rank])  # its forward, backward and optimizer step, not collectives
        pacer.attach(optimizer)
        loss_fn = pacer.wrap_loss_fn(loss_fn)
    acc = Accumulator(wrapped, optimizer, max_grad_norm=spec.optimizer.max_grad_norm,
                      wrapping=wrapping)  # fmt: skip
    sampler = GlobalBatchSampler(len(task.dataset), GLOBAL_BATCH, seed=spec.seed)
    limit = parse_memory(DEVICES[rank][1])
    memory = TensorMemory(limit, model=wrapped, optimizer=optimizer)
    peaks, oom, step_s = [], "", []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            batches = [task.batch(idx) for idx in sampler.micro_batches(plan, rank)]
            n_items = task.count_items(sampler.global_batch())
            with memory:
                acc.step(batches, loss_fn, global_items=n_items)
            step_s.append(time.perf_counter() - t0)
            peaks.append(memory.peak_bytes)
            sampler.advance()
        full = wrapping.full_state(wrapped)
    except torch.OutOfMemoryError as exc:
        oom, full = str(exc), None
    except RuntimeError as exc:  # a peer ran out of memory and left its collectives
        oom, full = f"stopped with its peer: {str(exc)[:80]}", None
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump((max(peaks, default=0), oom, full if rank == 0 else None, step_s), f)
    if not oom:
        dist.barrier()
        dist.destroy_process_group()
    else:
        os._exit(0)  # the peers wait in a collective: their timeout ends them


def _one_process(layers: int, steps: int, tmp: str, micro: int = 0) -> dict[str, torch.Tensor]:
    """The same steps in one process, each global batch as one micro-batch (no limit), or
    as micro-batches of `micro` samples: float32 rounding alone then moves the result."""
    torch.set_num_threads(1)
    spec = parse_spec(job_spec("lib-ref", layers, "none", [REFERENCE_DEVICE], steps, tmp))
    task = load_task(spec)
    torch.manual_seed(spec.seed)
    model = task.build_model()
    optimizer = build_optimizer(spec.optimizer)(model)
    acc = Accumulator(model, optimizer, max_grad_norm=spec.optimizer.max_grad_norm,
                      wrapping=REPLICATED)  # fmt: skip
    sampler = GlobalBatchSampler(len(task.dataset), GLOBAL_BATCH, seed=spec.seed)
    for _ in range(steps):
        indices = sampler.global_batch()
        size = micro or len(indices)
        parts = [task.batch(indices[i : i + size]) for i in range(0, len(indices), size)]
        acc.step(parts, task.loss_fn, global_items=task.count_items(indices))
        sampler.advance()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_library(
    layers: int,
    plan: Plan,
    steps: int,
    tmp: str,
    *,
    speeds: tuple[float, ...] | None = None,
    compare: bool = True,
) -> LibraryRun:
    """3 gloo ranks on `plan`; with `compare`, rank 0's parameters against one process."""
    out_dir = tempfile.mkdtemp(dir=tmp)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    mp.spawn(
        _library_rank, args=(3, port, layers, plan, steps, out_dir, speeds), nprocs=3, join=True
    )
    seconds = time.monotonic() - t0
    results = []
    for r in range(3):
        with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    full = results[0][2]
    difference = noise = (math.inf, math.inf)
    if full is not None and compare:
        whole = _one_process(layers, steps, tmp)
        difference = differences(full, whole)
        noise = differences(_one_process(layers, steps, tmp, micro=4), whole)
    return LibraryRun(
        layers, plan, tuple(r[0] for r in results), tuple(r[1] for r in results), difference,
        noise, seconds, tuple(results[0][3]),
    )  # fmt: skip


def train_library_largest(
    best: tuple[int, Plan], known: int, steps: int, retries: int, tmp: str
) -> tuple[LibraryRun | None, dict[int, str]]:
    """The largest model proportional plans on the carried figures, trained through the
    library; when a rank runs out of memory, smaller ones bisected above `known`."""
    layers, plan = best
    lo, hi, good, failed = known, layers + 1, None, {}
    for _ in range(1 + retries):
        print(f"train proportional through the library: {layers} layers")
        run = train_library(layers, plan, steps, tmp)
        print_library_run(run)
        if any(run.oom):
            failed[layers] = "ran out of memory"
            hi = layers
        else:
            good, lo = run, layers
        if hi - lo <= 1:
            break
        layers = (lo + hi) // 2
        plan = make_sharded_plan(
            GLOBAL_BATCH, carried_capacities(layers, tmp), "proportional", keep_all=True
        )
    return good, failed


def print_library_run(run: LibraryRun) -> None:
    print(f"  {run.plan.sharding}-{run.layers} (library, 3 gloo ranks): {run.seconds:.0f} s")
    for rank, peak, oom in zip(run.plan.ranks, run.peaks, run.oom):
        predicted = rank.predicted_peak_bytes
        ratio = f"{peak / predicted:.2f}" if peak and predicted else "-"
        share = "-" if rank.state_slice is None else rank.state_slice
        print(
            f"    rank {rank.rank} {rank.device_name:<8} micro-batches "
            f"{'+'.join(map(str, rank.micro_batches)):<16} share {share:>8} "
            f"peak measured {_mib(peak):>9} / predicted {_mib(predicted):>9} ({ratio})"
            + (f"  OUT OF MEMORY: {oom}" if oom else "")
        )
    if not math.isfinite(run.difference[0]):
        return
    print(
        f"    parameters vs one process: {run.difference[0]:.1e} (largest element "
        f"{run.difference[1]:.1e}); float32's own: one process in micro-batches of 4 vs "
        f"whole batches {run.noise[0]:.1e} (largest element {run.noise[1]:.1e})"
    )


# ---------------------------------------------------------------------------
# reporting


def print_run(run: Run, versus: str, difference: tuple[float, float]) -> None:
    plan, s = run.plan, run.summary
    print(
        f"  {run.label}: {run.samples_per_s:.1f} samples/s (plan predicted "
        f"{plan.predicted_samples_per_s:.1f}; its ideal {run.ideal:.1f}, measured / "
        f"ideal {run.samples_per_s / run.ideal:.3f}); others used {run.foreign_load:.0%} of "
        "the CPU"
    )
    with_buckets = " (+ DDP buckets)" if plan.sharding == "none" else ""
    for (r, measured, predicted, total), rank in zip(run.peaks(), plan.ranks):
        ratio = f"{measured / predicted:.2f}" if measured and predicted else "-"
        print(
            f"    rank {r} {rank.device_name:<8} ({_mib(total)}) micro-batches "
            f"{'+'.join(map(str, rank.micro_batches)):<12} peak measured {_mib(measured):>9}"
            f" / predicted{with_buckets} {_mib(predicted):>9} ({ratio})"
        )
    compared = ""
    if versus:
        compared = (
            f"; parameters vs {versus}: {difference[0]:.1e} (largest element {difference[1]:.1e})"
        )
    print(
        f"    OOM events {s.oom_events}, restarts {s.restarts}; global batches exact: "
        f"{'yes' if run.exact_batches else 'NO'}{compared}"
    )


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(
    best: dict[str, Size],
    largest: dict[str, Largest],
    same: dict[str, Run],
    diffs: dict[str, tuple[float, float]],
    alone: list[Run],
) -> None:
    """The RESULT and goals lines (make_results.py copies them into the summary)."""
    planned = {m: best[m].params / best["none"].params for m in MODES}
    sizes = [f"{m} {_size(best[m].params, best[m].layers, planned[m])}" for m in MODES]
    print("RESULT largest model that plans on all 3 ranks: " + "; ".join(sizes))
    if not largest:
        print("goals (planned): " + "; ".join(_goals(planned)))
        return
    trained = {m: x.params / largest["none"].params for m, x in largest.items()}
    sizes = []
    for m, x in largest.items():
        failed = [f"{n} layers {_why(e)}" for n, e in sorted(x.failed.items(), reverse=True)]
        note = f"; {', '.join(failed)}" if failed else ""
        sizes.append(f"{m} {_size(x.params, x.layers, trained[m], note)}")
    print("RESULT largest model that trains on all 3 ranks: " + "; ".join(sizes))
    runs = [x.run for x in largest.values() if x.run is not None]
    speeds = [
        f"{r.plan.sharding} {r.samples_per_s:.1f}, {r.samples_per_s / r.ideal:.3f} of the "
        f"plan's ideal (predicted {r.plan.efficiency:.3f})"
        for r in runs
    ]
    print("RESULT samples/s of the largest models: " + "; ".join(speeds))
    unique = {r.label: r for r in [*runs, *same.values()]}.values()
    highest = [f"{r.label} {max(m / p for _, m, p, _ in r.peaks() if m and p):.2f}" for r in unique]
    print(
        "RESULT peak measured / predicted (none: + DDP buckets), the highest rank's: "
        + ", ".join(highest)
    )
    if same:
        ideal = sum(r.samples_per_s for r in alone)
        modes = [
            f"{m} {r.samples_per_s / ideal:.3f} (planned "
            f"{r.plan.predicted_samples_per_s / ideal:.3f})"
            for m, r in same.items()
        ]
        print(
            f"RESULT efficiency (bench_hetero's: measured / the devices alone; "
            f"{largest['none'].layers} layers, the largest of none): {', '.join(modes)} of the "
            f"ideal {ideal:.1f} samples/s (= {' + '.join(f'{r.samples_per_s:.1f}' for r in alone)})"
        )
    oom = [
        f"{x.mode} at {n} layers: {_why(e)}" for x in largest.values() for n, e in x.failed.items()
    ]
    oom += [r.label for r in [*runs, *same.values(), *alone] if not r.no_oom()]
    compared = [x.difference[0] for x in largest.values() if x.versus]
    compared += [d[0] for d in diffs.values()]
    exact = all(r.exact_batches for r in [*runs, *same.values()])
    exact = exact and max(compared, default=0.0) <= TOLERANCE
    goals = _goals(trained) + [
        f"no OOM after the probe {_met(not oom)}" + (f" ({'; '.join(oom)})" if oom else ""),
        f"exact global batches and parameters (<= {TOLERANCE:g}) {_met(exact)}",
    ]
    print("goals (what trains): " + "; ".join(goals))


def _why(error: str) -> str:
    return "ran out of memory" if "out of memory" in error else "failed"


def _size(params: int, layers: int, ratio: float, note: str = "") -> str:
    return f"{params / 1e6:.3f} M parameters ({layers} layers, {ratio:.2f}x none{note})"


def _goals(ratios: dict[str, float]) -> list[str]:
    return [f"{m} >= {GOALS[m]}x none {_met(ratios.get(m, 0.0) >= GOALS[m])}" for m in GOALS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--speed-scale", type=float, default=0.5, help="the largest's speed")
    parser.add_argument("--max-layers", type=int, default=64, help="where the search stops")
    parser.add_argument(
        "--max-layers-carried", type=int, default=256, help="where part 4's search stops"
    )
    parser.add_argument("--retries", type=int, default=2, help="smaller sizes after an OOM")
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="max s to wait per job")
    parser.add_argument("--search-only", action="store_true", help="probe and plan only")
    parser.add_argument(
        "--proportional-only", action="store_true", help="only part 4: proportional past the probe"
    )
    parser.add_argument("--what-if-only", action="store_true", help="only part 6: the what-if")
    args = parser.parse_args()
    if args.what_if_only:
        what_if_llama()
        return
    if args.steps <= SKIP + 1:
        parser.error(f"--steps must be > {SKIP + 1}")
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(1)  # as the launcher's workers
    os.environ.setdefault("RAY_worker_niceness", "0")
    sims = simulated(args.speed_scale)
    t0 = time.monotonic()
    shown = ", ".join(f"{s['name']} {s['memory']} speed {s['speed']}" for s in sims)
    print(
        f"devices: {shown} (all kept); tiny GPT {MODEL} with n_layers growing; AdamW fp32, "
        f"global batch {GLOBAL_BATCH}; torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    largest: dict[str, Largest] = {}
    same: dict[str, Run] = {}
    diffs: dict[str, tuple[float, float]] = {}
    alone: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AUTOBATCH_PROFILE_CACHE"] = f"{tmp}/profiles"
        print("search: probe every device, plan each mode on all 3 ranks (micro-batch limits)")
        best = search(args.max_layers, f"{tmp}/search-profiles")
        print(f"search done in {time.monotonic() - t0:.0f} s")
        if not args.search_only and not args.proportional_only:

            def each_mode(replicated: Run, layers: int) -> None:
                nonlocal same, diffs, alone
                same, diffs, alone = each_mode_and_alone(tmp, replicated, layers, sims, args)

            largest["none"] = train_largest(tmp, "none", best["none"], 0, sims, args, each_mode)
            if largest["none"].run is None:
                raise SystemExit("none: its largest model did not train; see above")
            for mode in MODES[1:]:
                known = largest["none"].layers if same[mode].no_oom() else 0
                largest[mode] = train_largest(tmp, mode, best[mode], known, sims, args)
        if not args.search_only:
            proportional_past_the_probe(best, largest, args, f"{tmp}/carried")
    if not args.proportional_only:
        report(best, largest, same, diffs, alone)
    what_if_llama()
    print(f"wall time {time.monotonic() - t0:.0f} s")


WHAT_IF_DEVICES = "2xA100-80GB,4xT4-16GB"


def what_if_llama() -> None:
    """Part 6: the combinations of levers only proportional fits, from the CLI's JSON."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable, "-m", "launcher.cli", "plan", "configs/whatif-llama-8b.yaml",
        "--what-if", "--devices", WHAT_IF_DEVICES, "--json",
    ]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"what-if failed: {done.stderr.strip()}")
    result = json.loads(done.stdout)
    rows = {
        (r["precision"], r["lora"], r["gradient_checkpointing"], r["sharding"]): r
        for r in result["rows"]
    }
    only = []
    for lv in result["only_with"].get("proportional", []):
        key = (lv["precision"], lv["lora"], lv["gradient_checkpointing"])
        shares = "/".join(f"{s:.1%}" for s in rows[(*key, "proportional")]["state_shares"])
        lora = "LoRA" if lv["lora"] else "no LoRA"
        ckpt = "checkpointing" if lv["gradient_checkpointing"] else "no checkpointing"
        only.append(f"{lv['precision']}, {lora}, {ckpt} (state shares {shares})")
    print(
        f"RESULT what-if {result['model']} on {WHAT_IF_DEVICES} (estimates, "
        f"{time.monotonic() - t0:.0f} s): fits only with proportional: "
        + ("; ".join(only) or "none")
    )


def proportional_past_the_probe(
    best: dict[str, Size], largest: dict[str, Largest], args: argparse.Namespace, cache: str
) -> None:
    """Part 4 and its RESULT and goal lines: proportional vs full (and none) in layers."""
    print("proportional past the probe: figures probed on sim-ref (512 MiB), carried over")
    found = carried_search(16, args.max_layers_carried, cache)  # 16 plans in both
    (full_layers, _), prop = found["full"], found["proportional"]
    print(
        f"  largest that plans on the carried figures: full {full_layers}, proportional {prop[0]}"
    )
    run, failed = train_library_largest(prop, 0, args.steps, args.retries, cache)
    trained = {m: (x.layers, x.params) for m, x in largest.items() if x.run is not None}
    none = trained.get("none", (best["none"].layers, best["none"].params))
    full = trained.get("full", (best["full"].layers, best["full"].params))
    ok = run is not None and run.difference[0] <= TOLERANCE
    layers = run.layers if run is not None else 0
    params = count_params(layers) if layers else 0
    fails = ", ".join(f"{n} layers {why}" for n, why in sorted(failed.items(), reverse=True))
    print(
        "RESULT largest model proportional trains on all 3 ranks (library, figures carried "
        f"from sim-ref): {params / 1e6:.3f} M parameters ({layers} layers, "
        f"{params / full[1]:.2f}x full's {full[1] / 1e6:.3f} M at {full[0]} layers, "
        f"{params / none[1]:.2f}x none's {none[1] / 1e6:.3f} M)" + (f"; {fails}" if fails else "")
    )
    if run is not None:
        worst = max(p / r.predicted_peak_bytes for p, r in zip(run.peaks, run.plan.ranks))
        print(
            f"RESULT proportional-{layers}: peak measured / predicted, the highest rank's "
            f"{worst:.2f}; parameters vs one process {run.difference[0]:.1e} (one process "
            f"in micro-batches of 4 vs whole: {run.noise[0]:.1e})"
        )
    ratio = speed_against_full(full_layers, args.steps, cache)
    print(
        f"goals (proportional): >= 2x full {_met(params >= 2 * full[1])}; no OOM "
        f"{_met(run is not None and not any(run.oom))}; parameters (<= {TOLERANCE:g}) "
        f"{_met(ok)}; samples/s >= full's at full's largest {_met(ratio >= 1.0)}"
    )


def speed_against_full(layers: int, steps: int, cache: str) -> float:
    """Part 5: proportional's samples/s over full's at the largest model full plans on the
    carried figures. Both train through the library (part 4's ranks), each rank paced to
    its device's speed (`Pacer`: its measured forward, backward and optimizer step
    stretched by 1/speed, collectives not), alternately twice (full, proportional, full,
    proportional: a drift in the machine's load falls on both); each mode's mean."""
    caps = carried_capacities(layers, cache)
    plans = {m: make_sharded_plan(GLOBAL_BATCH, caps, m, keep_all=True) for m in PAIR}
    speeds = tuple(speed for _, _, speed in DEVICES)
    got: dict[str, list[float]] = {m: [] for m in PAIR}
    for _ in range(2):
        for mode in PAIR:
            run = train_library(layers, plans[mode], steps, cache, speeds=speeds, compare=False)
            print_library_run(run)
            if any(run.oom):
                print(f"RESULT {mode}-{layers} (paced) ran out of memory: no speed to compare")
                return 0.0
            got[mode].append(run.samples_per_s)
            print(f"    {run.samples_per_s:.2f} samples/s (paced, steps after the first {SKIP})")
    mean = {m: sum(v) / len(v) for m, v in got.items()}
    ratio = mean["proportional"] / mean["full"]
    runs = "; ".join(f"{m} {' '.join(f'{x:.2f}' for x in v)}" for m, v in got.items())
    print(
        f"RESULT samples/s at full's largest ({layers} layers, library, paced "
        f"{'/'.join(map(str, speeds))}): proportional/full {ratio:.2f} ({runs})"
    )
    return ratio


if __name__ == "__main__":
    main()
