"""Heterogeneous DDP and FSDP2 on one NVIDIA GPU: ranks with different memory caps, probed,
planned, trained.

    OUT=<dir> bash benchmarks/gpu_run.sh      # this and gpu_probe_check.py, see there
    python3 benchmarks/gpu_check.py [--caps-gib 4 2.5 1.5] [--steps 30] [--rounds 2]
        [--sharding [optimizer] [full] [proportional]] [--sharded-steps 8]
        [--time-limit S] [--no-write] [--cpu] [--plant-failure RANK]

Runs from a bare checkout with the machine's python (torch and numpy; the
repository goes on sys.path, see gpu_common.py). Three processes (one per entry
of --caps-gib) share GPU 0. NCCL refuses two ranks on one GPU, so they form a
gloo process group. Each caps its allocator with
torch.cuda.set_per_process_memory_fraction, so each has a different largest
micro-batch. Then, with a small GPT in bf16 (fp16 where the GPU has no bf16) and
AdamW(foreach=True), in phases:

1. probe: each rank in turn runs `profile_model(backend="gloo")` (at most 4
   measured steps; DDP's gradient buckets reserved, no NCCL buffers: gloo keeps
   its buffers in host memory), the others wait, so timings are not disturbed;
2. plan: the capacities are all-gathered, every rank computes the same
   `make_plan` (and `equal_split_plan`, today's DDP recipe);
3. gradients: the first step's gradient under the plan (and in fp32 under a plan
   at a third of each limit: fp32 activations are larger), kept for the
   single-process full-batch reference the parent computes at the end;
4. runs: `--steps` optimizer steps per run from the same initial weights, the
   plan and the equal split alternating (plan, equal split, equal split, plan
   for --rounds 2), with the library's Accumulator under DDP (sync_loss=False, so
   the gradient all-reduce is the only collective of a step; the launcher's
   worker adds one, see bench_hetero). A DDP communication hook counts gradient
   buckets and `dist.all_reduce` is wrapped to count any other all-reduce;
5. sharded, per mode of --sharding (default all three): the same ranks, group and
   capacities with the model under `Sharded(mode)` (FSDP2, autobatch.step.shard) or
   `Proportional(plan.state_slices)` (autobatch.step.proportional: each rank owns the
   planned share of the flat state; its broadcasts and reduces go through host memory
   under gloo by design), planned by `make_sharded_plan` (every rank kept; proportional
   jointly, shares and micro-batches); `EXACT_STEPS` fp32 optimizer
   steps of a plan at a third of each sharded limit, whose parameters are kept for
   the single-process full-batch reference (the same steps in one process), then
   --sharded-steps steps in the check's precision, whose peak is measured against
   the plan's prediction (no DDP buckets: sharded modes hold none) and whose
   all-gathers and reduce-scatters (proportional: broadcasts and reduces) are counted
   (`ShardedCollectives`). Proportional is left out where the GPU has no bf16 (it refuses
   fp16's loss scaler; its plan comes from the probe's fp16 figures).

The gradient all-reduce goes through host memory: the comm hook copies each
bucket to the host, all-reduces it there (one all-reduce per bucket, as DDP's
default hook) and copies it back, in the runs and in the first-step gradients.
gloo on CUDA tensors is deprecated in torch and has had gradient-corruption bugs
in DDP's futures: staged, such a bug cannot show up as a failure of the library.
DDP's start-up broadcasts are skipped (every rank builds the same seeded weights);
its one other collective, a broadcast of bucket indices after the first step,
stays on the GPU, and the set-up phase tries such a broadcast first. FSDP2's
all-gathers and reduce-scatters are staged the same way (`stage_fsdp`: FSDP2's
custom collectives; a reduce-scatter is an all-reduce of a host copy), and the
parameters are gathered for the reference by hand: torch 2.11's `full_tensor()`
crashed (segmentation fault) on CUDA tensors under gloo on an H200.
`--fsdp-collectives direct` runs FSDP2's own collectives through gloo on the
device's tensors instead, after checking one of each against its known answer
(`check_gloo_collectives`).

It reports per rank: the cap, the planned micro-batches, the probe's predicted
peak for that micro-batch (plus DDP's buckets, which the single-process probe
does not hold) against the allocator's measured and reserved peak; synced
backwards, buckets and other all-reduces per step; the first step's gradient
against the single-process full-batch reference as a relative L2 error (next to
the bf16 reference's own error against fp32), and the fp32 plan against the fp32
reference (exact up to rounding); samples/s of every run (wall time on rank 0,
steps after the first `WARMUP`); per rank the plan's predicted compute per step
against the measured one (the launcher's `ComputeClock`: the rank's micro-steps, the
wait at the all-reduce left out, CUDA events on a GPU) and per micro-batch size the
plan's time line against the median measured micro-step. Per sharded mode: per rank the
planned micro-batches, predicted and measured peak, all-gathers and reduce-scatters per step
(checked: "optimizer" one of each per unit and step, "full" per micro-step; "proportional"
a broadcast per owner of each unit in the forward and of each block again in the backward,
a reduce per owner of each unit, per micro-step), the
run's samples/s against the DDP plan runs', and the fp32 parameters, and their change
from the initial weights, against the reference as relative L2 errors (checked: the
change within `UPDATE_TOLERANCE`, every peak within the prediction + `PEAK_SLACK`).
The three ranks share one GPU without MPS, so their kernels take turns: the
plan-vs-equal-split ratio measured here counts micro-steps and communication, not
load balance across devices of different speeds (every rank computes at the same
speed).

Failures: the parent and rank 0 print a line per phase as it goes; each rank
saves what it measured after every phase (a JSON in a work directory, copied
into $OUT/gpu_check.json while the ranks run). An error in any rank (an
out-of-memory, a gloo timeout, `--plant-failure RANK`: that rank raises an
out-of-memory in the second run) is recorded with its phase; the other ranks
fail at their next collective and record theirs. The report then keeps
everything measured before the failure and ends with a FAILED section. The work
directory is removed after a clean run, kept (its path printed) otherwise.

Results are printed and written to $OUT/gpu_check.md and .json when OUT is set;
on a GPU, unless --no-write, also to this check's part of the GPU section of
benchmarks/RESULTS.md, passed or FAILED (a failed run is a result too). `--cpu`
runs the same code on the CPU with simulated devices of --caps-mib, as a
functional check (it writes $OUT only). Meant to finish in 5 minutes on one GPU.
"""

from __future__ import annotations

import gpu_common  # first: the repository on sys.path, the environment guarded

# isort: split

import argparse
import contextlib
import datetime
import faulthandler
import functools
import gc
import inspect
import json
import math
import pathlib
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.planning.plan import DeviceCapacity, Plan
from autobatch.planning.planner import equal_split_plan, make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.planning.sharded import make_sharded_plan
from autobatch.probe.devices import DeviceInfo, SimulatedDevice
from autobatch.probe.measure import to_device
from autobatch.probe.profile import ModelProfile, profile_model
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.step.proportional import ProportionalModule
from autobatch.step.shard import SHARD_MODES, repeated_blocks
from autobatch.step.wrap import wrapping_for
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import tiny_gpt_task
from launcher.job import policy
from launcher.job.rebalancing import ComputeClock

GPU_MODEL = {"vocab_size": 8192, "seq_len": 512, "d_model": 512, "n_heads": 8, "n_layers": 6}
CPU_MODEL = {"seq_len": 64}  # the demo's tiny GPT, for --cpu
GLOBAL_BATCH = 64
WARMUP = 5  # steps not timed
SEED = 0
COLLECTIVE_TIMEOUT_S = 90  # gloo: a rank that waits longer for the others fails
GRACE_S = 30  # after a rank failed, how long the others get to record their own error
PLANTED_STEP = 2  # --plant-failure: the step of the second run where that rank fails
EXACT_STEPS = 3  # sharded: fp32 optimizer steps whose parameters meet the reference's
UPDATE_TOLERANCE = 1e-4  # sharded: fp32 change of the parameters, relative L2 error
PEAK_SLACK = 0.05  # sharded: a measured peak may exceed the prediction by this much
GATHERS = ("all_gather_single", "all_gather_into_tensor")  # FSDP2's, by torch version
SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")
CHECK_MODES = (*SHARD_MODES, "proportional")
COLLECTIVE_NAMES = {  # what each mode's gathers and reduces are, as the report names them
    "optimizer": ("all-gathers", "reduce-scatters"),
    "full": ("all-gathers", "reduce-scatters"),
    "proportional": ("broadcasts", "reduces"),
}
TITLE = "gpu_check.py: 3 ranks with different memory caps on one GPU, DDP and FSDP2"


@dataclass(frozen=True)
class Settings:
    caps_bytes: tuple[int, ...]  # one rank per cap
    steps: int
    rounds: int
    cpu: bool
    precision: str
    port: int
    work_dir: str
    t0: float  # the parent's start (time.time()), for progress lines
    plant_failure: int | None = None
    sharding: tuple[str, ...] = ()  # sharded modes to run after the DDP runs
    sharded_steps: int = 8  # per sharded run
    staged_fsdp: bool = True  # FSDP2's collectives through host memory (`stage_fsdp`)

    @property
    def world(self) -> int:
        return len(self.caps_bytes)

    def task(self) -> Task:
        return _task(self.cpu)

    def run_order(self) -> list[str]:
        """The plan and the equal split, alternating which goes first: ABBA..."""
        order: list[str] = []
        for i in range(self.rounds):
            order += ["plan", "equal split"][:: 1 if i % 2 == 0 else -1]
        return order


@functools.cache
def _task(cpu: bool) -> Task:
    return tiny_gpt_task(dataset_size=2048, seed=SEED, **(CPU_MODEL if cpu else GPU_MODEL))


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)


# ---------------------------------------------------------------------------
# the gradient all-reduce, staged through host memory, and counting collectives


def host_staged_allreduce(process_group, bucket):  # noqa: ANN001, ANN201  (DDP checks annotations)
    """DDP comm hook: the bucket's mean over ranks, all-reduced in host memory.

    One all-reduce per bucket, as DDP's default hook, but never on CUDA tensors: the
    bucket is copied to the host (blocking), all-reduced there and copied back, and
    the future is returned complete."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    host = buffer.cpu() if buffer.is_cuda else buffer
    host.div_(dist.get_world_size(group))
    dist.all_reduce(host, group=group)  # looked up at call time: `Collectives` counts it
    if host is not buffer:
        buffer.copy_(host)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


class Collectives:
    """Counts DDP's gradient-bucket all-reduces (a comm hook) and every other all-reduce."""

    def __init__(self) -> None:
        self.bucket_calls = 0  # one per gradient bucket
        self.synced_backwards = 0  # the last bucket of a backward: one per synced backward
        self.all_reduce_calls = 0  # every dist.all_reduce, the hook's included
        self._original = dist.all_reduce

        def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
            self.all_reduce_calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce

    def hook(self, state, bucket):  # noqa: ANN001, ANN201  (DDP checks real annotations)
        self.bucket_calls += 1
        self.synced_backwards += int(bucket.is_last())
        return host_staged_allreduce(state, bucket)

    def counts(self) -> tuple[int, int, int]:
        return self.synced_backwards, self.bucket_calls, self.all_reduce_calls - self.bucket_calls

    def close(self) -> None:
        dist.all_reduce = self._original


class GradSnapshot(torch.optim.Optimizer):
    """An optimizer whose step copies the (synced, unscaled) gradients and changes nothing."""

    def __init__(self, model: torch.nn.Module) -> None:
        named = list(model.named_parameters())
        super().__init__([p for _, p in named], {})
        self.names = [n for n, _ in named]
        self.grads: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        params = self.param_groups[0]["params"]
        self.grads = {n: p.grad.detach().float().cpu() for n, p in zip(self.names, params)}


# ---------------------------------------------------------------------------
# one rank


class RankLog:
    """What one rank measured so far, saved after every phase (the parent reads it)."""

    def __init__(self, settings: Settings, rank: int) -> None:
        self.rank, self.t0 = rank, settings.t0
        self.path = pathlib.Path(settings.work_dir) / f"rank{rank}.json"
        self.data: dict[str, Any] = {
            "rank": rank,
            "cap_bytes": settings.caps_bytes[rank],
            "current": "start",
            "phases": [],
            "runs": [],
            "done": False,
            "error": None,
        }

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.data["current"] = name
        self.save()
        t = time.time()
        yield
        self.data["phases"].append({"phase": name, "s": round(time.time() - t, 2)})
        self.save()

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[gpu_check +{time.time() - self.t0:5.1f} s] {text}", flush=True)

    def save(self) -> None:
        gpu_common.atomic_write_json(self.path, self.data)


def device_info(settings: Settings, rank: int) -> tuple[DeviceInfo, torch.device]:
    """This rank's device: GPU 0 capped to its fraction, or a simulated CPU device."""
    cap = settings.caps_bytes[rank]
    if settings.cpu:
        return SimulatedDevice(f"cpu-cap{rank}", cap).info(rank), torch.device("cpu")
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    info = gpu_common.cuda_device_info(0)
    torch.cuda.set_per_process_memory_fraction(cap / info.total_bytes, device)
    return info, device


def probe_in_turn(settings: Settings, rank: int, info: DeviceInfo) -> ModelProfile:
    profile = None
    for turn in range(settings.world):
        if turn == rank:
            torch.manual_seed(SEED)
            profile = profile_model(
                settings.task(),
                info,
                make_optimizer=adamw,
                precision=settings.precision,
                backend="gloo",  # what this check's process group is: no NCCL reserve
            )
        dist.barrier()
    assert profile is not None
    return profile


@dataclass
class RunStats:
    """One training run of one rank."""

    samples_per_s: float
    peak_bytes: int
    reserved_bytes: int | None
    syncs_per_step: tuple[int, ...]
    buckets_per_step: tuple[int, ...]
    other_all_reduces_per_step: tuple[int, ...]
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)
    # this rank's compute per timed step (ComputeClock: its micro-steps, not the wait at
    # the all-reduce), the plan's prediction of it, and per micro-batch size the median
    # measured micro-step against the plan's time line
    compute_s: list[float] = field(default_factory=list)
    predicted_compute_s: float | None = None
    micro_step_by_size: dict[str, dict[str, float]] = field(default_factory=dict)


class _Peak:
    """The allocator's peak on CUDA; counted tensor bytes on the CPU."""

    def __init__(self, device: torch.device, model: torch.nn.Module, opt: Any) -> None:
        self.device = device
        self.memory = None if device.type == "cuda" else TensorMemory(model=model, optimizer=opt)
        self.peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def __enter__(self) -> None:
        if self.memory is not None:
            self.memory.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.memory is not None:
            self.peak = max(self.peak, self.memory.peak_bytes)
            self.memory.__exit__(*exc)

    def result(self) -> tuple[int, int | None]:
        if self.memory is not None:
            return self.peak, None
        d = self.device
        return torch.cuda.max_memory_allocated(d), torch.cuda.max_memory_reserved(d)


def _ddp(model: torch.nn.Module, device: torch.device, hook: Any) -> DDP:
    """DDP with `hook` for the gradient all-reduce. Every rank builds the same seeded
    weights, so DDP's start-up broadcasts (gloo on CUDA tensors) are skipped where this
    torch can (init_sync, torch >= 2.6); the model has no buffers to broadcast."""
    kwargs: dict[str, Any] = {}
    if "init_sync" in inspect.signature(DDP.__init__).parameters:
        kwargs["init_sync"] = False
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
    ddp.register_comm_hook(None, hook)
    return ddp


def train(
    settings: Settings, rank: int, device: torch.device, plan: Plan, *, fail_at: int | None = None
) -> RunStats:
    """`settings.steps` steps of `plan` from the seeded initial weights (`fail_at`: raise an
    out-of-memory at that step, a planted failure)."""
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    counter = Collectives()
    ddp = _ddp(model, device, counter.hook)
    opt = adamw(model)
    acc = Accumulator(ddp, opt, precision=settings.precision)
    sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=SEED)
    peak = _Peak(device, model, opt)
    clock = ComputeClock(model, device)  # the launcher's: CUDA events on a GPU
    loss_fn = clock.wrap(task.loss_fn)
    syncs, buckets, others, losses, compute = [], [], [], [], []
    by_size: dict[int, list[float]] = {}
    t0 = 0.0
    try:
        for step in range(settings.steps):
            if step == WARMUP:
                _sync(device)
                t0 = time.perf_counter()
            batches = [to_device(task.batch(i), device) for i in sampler.micro_batches(plan, rank)]
            n_items = task.count_items(sampler.global_batch())
            before = counter.counts()
            clock.start_step()
            with peak, _no_oom(f"rank {rank}, step {step}, {plan.ranks[rank].micro_batches}"):
                if step == fail_at:
                    raise torch.OutOfMemoryError(f"planted failure (--plant-failure {rank})")
                result = acc.step(batches, loss_fn, global_items=n_items, sync_loss=False)
            _append_counts(before, counter.counts(), syncs, buckets, others)
            if step >= WARMUP:
                spans = clock.step_compute(len(result.micro_step_s))
                measured = [w if c is None else c for c, w in zip(spans, result.micro_step_s)]
                compute.append(sum(measured))
                for size, t in zip(plan.ranks[rank].micro_batches, measured):
                    by_size.setdefault(size, []).append(t)
            losses.append(result.loss)
            sampler.advance()
            del batches
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        counter.close()
        clock.close()
    line = plan.capacity(rank).micro_step_time
    loss = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(loss)  # after the counted steps: each rank held its part of the loss
    peak_bytes, reserved = peak.result()
    del ddp, model, opt, acc, peak
    _free(device)
    return RunStats(
        samples_per_s=plan.global_batch_size * (settings.steps - WARMUP) / seconds,
        peak_bytes=peak_bytes,
        reserved_bytes=reserved,
        syncs_per_step=tuple(syncs),
        buckets_per_step=tuple(buckets),
        other_all_reduces_per_step=tuple(others),
        first_loss=float(loss[0]),
        last_loss=float(loss[-1]),
        losses=[round(float(x), 5) for x in loss],
        compute_s=compute,
        predicted_compute_s=sum(line(b) for b in plan.ranks[rank].micro_batches),
        micro_step_by_size={
            str(b): {"predicted_s": line(b), "measured_s": statistics.median(ts)}
            for b, ts in sorted(by_size.items())
        },
    )


class CheckFailure(RuntimeError):
    """A rank cannot go on (an out-of-memory): the others would wait in the all-reduce."""


def cause_order(exc: BaseException) -> int:
    """Where a rank's error sorts among a failed run's, as the failure policy judges an
    attempt's failures (`launcher.job.policy.ROOT_ORDER`): a bug or bad input first, then
    an out-of-memory (a CheckFailure, planted or not), then what another rank's failure
    causes (a collective broken by a peer, a signal)."""
    kind = "oom_synced" if isinstance(exc, CheckFailure) else policy.classify(exc)
    return policy.ROOT_ORDER[kind]


@contextlib.contextmanager
def _no_oom(where: str) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise CheckFailure(f"OUT OF MEMORY ({where}): {str(exc).splitlines()[0]}") from None


def _append_counts(
    before: tuple[int, int, int], after: tuple[int, int, int], *lists: list[int]
) -> None:
    for out, b, a in zip(lists, before, after):
        out.append(a - b)


def first_step_grads(
    settings: Settings, rank: int, device: torch.device, plan: Plan, precision: str
) -> dict[str, torch.Tensor]:
    """The gradients the Accumulator hands the optimizer in the plan's first step."""
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    ddp = _ddp(model, device, host_staged_allreduce)
    snapshot = GradSnapshot(model)
    scaler = None  # fp16: a scale of 1, so the first step is not skipped for overflow
    if precision == "fp16":
        scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
    acc = Accumulator(ddp, snapshot, precision=precision, scaler=scaler)
    sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=SEED)
    batches = [to_device(task.batch(i), device) for i in sampler.micro_batches(plan, rank)]
    with _no_oom(f"rank {rank}, first step in {precision}, {plan.ranks[rank].micro_batches}"):
        acc.step(batches, task.loss_fn, global_items=task.count_items(sampler.global_batch()))
    grads = snapshot.grads
    del ddp, model, acc, snapshot, batches  # the snapshot holds the parameters too
    _free(device)
    return grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# the sharded case: the same ranks, group and capacities under FSDP2 (`Sharded(mode)`)


class ShardedCollectives:
    """Counts a sharded mode's gathers and reduces: FSDP2's all-gathers and reduce-scatters
    (under every name torch has given them: FSDP2 calls exactly one per collective; torch's
    own aliases call each other through the module's globals, which this leaves alone), or
    with `proportional`, `Proportional`'s broadcasts and reduces."""

    def __init__(self, *, proportional: bool = False) -> None:
        gathers, scatters = (("broadcast",), ("reduce",)) if proportional else (GATHERS, SCATTERS)
        names = [n for n in (*gathers, *scatters) if hasattr(dist, n)]
        self.calls = {"gather": 0, "scatter": 0}
        self._originals = {n: getattr(dist, n) for n in names}
        for name, fn in self._originals.items():
            setattr(dist, name, self._counting("gather" if name in gathers else "scatter", fn))

    def _counting(self, kind: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[kind] += 1
            return fn(*args, **kwargs)

        return call

    def counts(self) -> tuple[int, int]:
        return self.calls["gather"], self.calls["scatter"]

    def close(self) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


class _Staged:
    """A collective FSDP2 calls in place of its own, counted in `counter`; buffers are
    allocated as FSDP2's default allocates them."""

    def __init__(self, counter: ShardedCollectives) -> None:
        self.counter = counter

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _StagedAllGather(_Staged, AllGather):
    """FSDP2's all-gather of a device tensor run by gloo on host copies."""

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
        async_op: bool = False,
    ) -> None:  # fmt: skip
        self.counter.calls["gather"] += 1
        parts = [torch.empty_like(input_tensor, device="cpu") for _ in range(group.size())]
        dist.all_gather(parts, input_tensor.cpu(), group=group)
        output_tensor.copy_(torch.cat(parts))


class _StagedReduceScatter(_Staged, ReduceScatter):
    """FSDP2's reduce-scatter as gloo's all-reduce of a host copy, this rank's slice kept."""

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
        async_op: bool = False,
    ) -> None:  # fmt: skip
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise CheckFailure(f"staged reduce-scatter: FSDP2 asked for {op}, not SUM or AVG")
        self.counter.calls["scatter"] += 1
        whole = input_tensor.cpu()
        dist.all_reduce(whole, group=group)
        if op == dist.ReduceOp.AVG:
            whole /= group.size()
        n = output_tensor.numel()
        output_tensor.copy_(
            whole.view(-1)[group.rank() * n : (group.rank() + 1) * n].view_as(output_tensor)
        )


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter whole, fp32, on the host. A DTensor's row shards (FSDP2's: torch.chunk's
    sizes) are gathered by gloo on host copies: torch 2.11's `full_tensor()` (a functional
    collective) crashed with a segmentation fault on CUDA tensors under gloo, on an H200."""
    if not isinstance(param, DTensor):
        return param.detach().float().cpu()
    world, rows = dist.get_world_size(), param.shape[0]
    chunk = -(-rows // world)
    local = param.to_local().detach().float().cpu()
    padded = torch.zeros((chunk, *param.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:rows].contiguous()


def stage_fsdp(model: torch.nn.Module, counter: ShardedCollectives) -> None:
    """Every FSDP2 unit's all-gathers and reduce-scatters through host memory, as the DDP
    runs' all-reduces (see the module docstring); counted in `counter`."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(_StagedAllGather(counter))
            module.set_custom_reduce_scatter(_StagedReduceScatter(counter))


def expected_collectives(
    mode: str, blocks: int, micro_steps: int, unit_owners: tuple[int, ...] = ()
) -> tuple[int, int]:
    """A rank's gathers and reduces per optimizer step, with `blocks` sharded blocks and the
    root: "optimizer" gathers and reduce-scatters each unit once whatever the micro-step
    count; "full" gathers every unit in each forward and each block again in each backward
    (the root stays gathered), and reduce-scatters every unit each time; "proportional" as
    "full", with a broadcast and a reduce per owner of a unit (`unit_owners`, root first)."""
    units = blocks + 1
    if mode == "optimizer":
        return units, units
    if mode == "proportional":
        pairs = sum(unit_owners)
        return micro_steps * (2 * pairs - unit_owners[0]), micro_steps * pairs
    return micro_steps * (units + blocks), micro_steps * units


def check_gloo_collectives(device: torch.device) -> None:
    """FSDP2's all-gather and reduce-scatter through this group on the device's tensors,
    against the known answers (gloo on CUDA tensors: see the module docstring)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gather = getattr(dist, next(n for n in GATHERS if hasattr(dist, n)))
    scatter = getattr(dist, next(n for n in SCATTERS if hasattr(dist, n)))
    gathered = torch.zeros(2 * world, device=device)
    gather(gathered, torch.full((2,), float(rank + 1), device=device))
    reduced = torch.zeros(2, device=device)
    scatter(reduced, torch.arange(2.0 * world, device=device) * (rank + 1))
    want_gathered = torch.arange(1.0, world + 1).repeat_interleave(2)
    want_reduced = torch.arange(2.0 * rank, 2 * rank + 2) * (world * (world + 1) // 2)
    if not (
        torch.equal(gathered.cpu(), want_gathered) and torch.equal(reduced.cpu(), want_reduced)
    ):
        raise CheckFailure(
            f"gloo on {device.type} tensors: all-gather gave {gathered.tolist()} (want "
            f"{want_gathered.tolist()}), reduce-scatter {reduced.tolist()} (want "
            f"{want_reduced.tolist()})"
        )


def sharded_plan(capacities: list[DeviceCapacity], mode: str) -> Plan:
    """The sharded planner's plan; on every rank, as this check trains on all."""
    plan = make_sharded_plan(GLOBAL_BATCH, capacities, mode)
    if plan.world_size < len(capacities):
        plan = make_sharded_plan(GLOBAL_BATCH, capacities, mode, keep_all=True)
    return plan


def at_a_third(capacities: list[DeviceCapacity], mode: str) -> list[DeviceCapacity]:
    """The capacities with each device's sharded micro-batch limit cut to a third (at least
    1; fp32 activations take about twice bf16's memory): the memory models' cap."""
    out = []
    for c in capacities:
        assert c.memory is not None  # the profile counted the model's state
        limit = max(1, c.sharded(mode, len(capacities)).max_micro_batch // 3)
        memory = replace(c.memory, max_micro_batch=min(c.memory.max_micro_batch, limit), cap=limit)
        out.append(replace(c, memory=memory, max_micro_batch=min(c.max_micro_batch, limit)))
    return out


@dataclass
class ShardedStats:
    """One sharded run of one rank."""

    samples_per_s: float | None  # None: too few steps to time
    peak_bytes: int
    reserved_bytes: int | None
    gathers_per_step: tuple[int, ...]
    scatters_per_step: tuple[int, ...]
    first_loss: float
    last_loss: float
    unit_owners: tuple[int, ...] = ()  # proportional: each unit's owners, the root first


def train_sharded(
    settings: Settings,
    rank: int,
    device: torch.device,
    plan: Plan,
    mode: str,
    *,
    precision: str,
    steps: int,
) -> tuple[ShardedStats, dict[str, torch.Tensor]]:
    """`steps` optimizer steps of `plan` under its wrapping (`Sharded(mode)`, or
    `Proportional` with the plan's slices) from the seeded initial weights; the stats and
    the parameters at the end (whole, fp32, on the host)."""
    task = settings.task()
    torch.manual_seed(SEED)
    wrapping = wrapping_for(mode, slices=plan.state_slices)
    wrapping.check_plan([r.accumulation_steps for r in plan.ranks])
    model = wrapping.wrap(task.build_model(), device)
    opt = adamw(model)  # after wrap: on the DTensor parameters, or the rank's pieces
    acc = Accumulator(model, opt, precision=precision, wrapping=wrapping)
    sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=SEED)
    peak = _Peak(device, model, opt)
    proportional = isinstance(model, ProportionalModule)
    counter = ShardedCollectives(proportional=proportional)
    if settings.staged_fsdp and not proportional:
        stage_fsdp(model, counter)
    gathers, scatters, losses = [], [], []
    t0 = 0.0
    try:
        for step in range(steps):
            if step == WARMUP:
                _sync(device)
                t0 = time.perf_counter()
            batches = [to_device(task.batch(i), device) for i in sampler.micro_batches(plan, rank)]
            n_items = task.count_items(sampler.global_batch())
            before = counter.counts()
            with (
                peak,
                _no_oom(f"rank {rank}, {mode} step {step}, {plan.ranks[rank].micro_batches}"),
            ):
                result = acc.step(batches, task.loss_fn, global_items=n_items, sync_loss=False)
            _append_counts(before, counter.counts(), gathers, scatters)
            losses.append(result.loss)
            sampler.advance()
            del batches
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        counter.close()
    params = _whole_params(model)  # a collective
    owners = ()
    if proportional:
        owners = tuple(len(model.layout.owners(u)) for u in range(model.layout.n_units))
    loss = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(loss)
    peak_bytes, reserved = peak.result()
    del model, opt, acc, peak
    _free(device)
    timed = steps - WARMUP
    stats = ShardedStats(
        samples_per_s=plan.global_batch_size * timed / seconds if timed > 1 else None,
        peak_bytes=peak_bytes,
        reserved_bytes=reserved,
        gathers_per_step=tuple(gathers),
        scatters_per_step=tuple(scatters),
        first_loss=float(loss[0]),
        last_loss=float(loss[-1]),
        unit_owners=owners,
    )
    return stats, params


def _whole_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every parameter whole, fp32, on the host, by the plain module's names."""
    if isinstance(model, ProportionalModule):
        names = {n for n, _ in model.inner.named_parameters()}
        state = model.full_state_dict()
        return {n: t.detach().float().cpu() for n, t in state.items() if n in names}
    return {n: _whole(p) for n, p in model.named_parameters()}


def run_sharded(
    settings: Settings,
    rank: int,
    device: torch.device,
    capacities: list[DeviceCapacity],
    mode: str,
    log: RankLog,
) -> None:
    """Plan for `mode`; its parameters after a few fp32 steps (kept for the reference);
    a run in the check's precision: peak against the plan's prediction, collectives."""
    entry: dict[str, Any] = log.data.setdefault("sharded", {}).setdefault(mode, {})
    with log.phase(f"sharded {mode}: plan"):
        plan = sharded_plan(capacities, mode)
        plan32 = make_sharded_plan(GLOBAL_BATCH, at_a_third(capacities, mode), mode, keep_all=True)
        task = settings.task()
        with torch.device("meta"):  # the units FSDP2 shards, counted without memory
            blocks = len(repeated_blocks(task.build_model()))
        entry.update(
            plan_json=plan.to_json(indent=None),
            plan32_micro_batches=[list(r.micro_batches) for r in plan32.ranks],
            blocks=blocks,
        )
        log.say(f"sharded {mode}: {plan.summary_lines()[0]}; micro-batches {_micro(plan)}")
    with log.phase(f"sharded {mode}: parameters"):
        _, params = train_sharded(
            settings, rank, device, plan32, mode, precision="fp32", steps=EXACT_STEPS
        )
        if rank == 0:
            torch.save(params, f"{settings.work_dir}/sharded-{mode}.pt")
        del params
        log.say(f"sharded {mode}: {EXACT_STEPS} fp32 steps, micro-batches {_micro(plan32)}, kept")
    with log.phase(f"sharded {mode}: run"):
        stats, _ = train_sharded(
            settings, rank, device, plan, mode, precision=settings.precision,
            steps=settings.sharded_steps,
        )  # fmt: skip
        entry["run"] = asdict(stats)
        speed = "-" if stats.samples_per_s is None else f"{stats.samples_per_s:.1f}"
        log.say(
            f"sharded {mode}: {speed} samples/s, loss {stats.first_loss:.3f} -> "
            f"{stats.last_loss:.3f}; rank 0 peak {_mib(stats.peak_bytes)} (predicted "
            f"{_mib(plan.ranks[rank].predicted_peak_bytes)})"
        )


def rank_main(rank: int, settings: Settings) -> None:
    """One rank (a spawned process): its phases, each saved as it ends; an error is saved
    with the phase it ended and the process exits 1."""
    log = RankLog(settings, rank)
    faulthandler.enable()  # a crash in native code prints each thread's Python stack
    torch.set_num_threads(1)
    try:
        with log.phase("set-up"):
            info, device = device_info(settings, rank)
            log.data["device"] = info.name
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{settings.port}",
                rank=rank,
                world_size=settings.world,
                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            )
            if device.type == "cuda":  # DDP rebuilds its buckets with one such broadcast
                dist.broadcast(torch.zeros(1, device=device), src=0)  # gloo on a CUDA tensor
            if settings.sharding and not settings.staged_fsdp:
                check_gloo_collectives(device)
        run_phases(settings, rank, device, info, log)
        log.data["done"] = True
        log.save()
    except BaseException as exc:
        log.data["error"] = {
            "phase": log.data["current"],
            "at_s": round(time.time() - settings.t0, 1),
            "cause": cause_order(exc),
            "error": gpu_common.error_line(exc),
            "traceback": traceback.format_exc()[-4000:],
        }
        log.save()
        print(
            f"[gpu_check] rank {rank} FAILED in {log.data['current']}: "
            f"{gpu_common.error_line(exc)}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_phases(
    settings: Settings, rank: int, device: torch.device, info: DeviceInfo, log: RankLog
) -> None:
    with log.phase("probe"):
        profile = probe_in_turn(settings, rank, info)
        log.data["profile"] = _profile_summary(profile)
        gathered: list[Any] = [None] * settings.world
        dist.all_gather_object(gathered, (profile.capacity(f"rank{rank}", info.name), log.data))
        capacities = [c for c, _ in gathered]
        for r, (_, other) in enumerate(gathered):
            p = other["profile"]
            log.say(
                f"probe: rank {r} (cap {_mib(other['cap_bytes'])}): largest micro-batch "
                f"{p['max_micro_batch']}, budget {_mib(p['budget_bytes'])}, reserve "
                f"{_reserve(p['reserve'])}, {p['measured_steps']} measured steps"
            )
    with log.phase("plan"):
        plan = make_plan(GLOBAL_BATCH, capacities)
        if plan.world_size < settings.world:  # a rank left out: this check trains on all
            plan = make_plan(GLOBAL_BATCH, capacities, keep_all=True)
        equal = equal_split_plan(GLOBAL_BATCH, capacities)
        # fp32 activations take about twice the memory: a plan at a third of each limit
        smaller = [replace(c, max_micro_batch=max(1, c.max_micro_batch // 3)) for c in capacities]
        plan32 = make_plan(GLOBAL_BATCH, smaller, keep_all=True)
        b = plan.ranks[rank].micro_batch_size
        log.data["profile"]["predicted_peak_bytes"] = profile.peak_bytes(b)
        log.data.update(
            plan_json=plan.to_json(indent=None),
            plan32_micro_batches=[list(r.micro_batches) for r in plan32.ranks],
            equal_json=equal.to_json(indent=None),
        )
        log.say(f"plan: {plan.summary_lines()[0]}; micro-batches {_micro(plan)}")
        log.say(f"equal split: micro-batches {_micro(equal)}")
    with log.phase("gradients"):
        grads = first_step_grads(settings, rank, device, plan, settings.precision)
        grads32 = first_step_grads(settings, rank, device, plan32, "fp32")
        if rank == 0:
            torch.save({"grads": grads, "grads32": grads32}, f"{settings.work_dir}/grads.pt")
        del grads, grads32
        log.say(f"gradients: the first step's in {settings.precision} and in fp32, kept")
    plans = {"plan": plan, "equal split": equal}
    order = settings.run_order()
    for i, label in enumerate(order):
        name = f"run {i + 1}/{len(order)} ({label})"
        with log.phase(name):
            planted = settings.plant_failure == rank and i == 1
            stats = train(
                settings, rank, device, plans[label], fail_at=PLANTED_STEP if planted else None
            )
            log.data["runs"].append({"label": label, **asdict(stats)})
            log.say(
                f"{name}: {stats.samples_per_s:.1f} samples/s, loss {stats.first_loss:.3f} -> "
                f"{stats.last_loss:.3f}; rank 0 peak {_mib(stats.peak_bytes)}, reserved "
                f"{_mib(stats.reserved_bytes)}"
            )
    for mode in settings.sharding:
        run_sharded(settings, rank, device, capacities, mode, log)


def _reserve(reserve: dict[str, int]) -> str:
    return ", ".join(f"{k} {_mib(v)}" for k, v in reserve.items()) or "none"


def _micro(plan: Plan) -> str:
    return " | ".join("+".join(map(str, r.micro_batches)) for r in plan.ranks)


def _profile_summary(p: ModelProfile) -> dict:
    reserve = dict(p.reserve)
    return {
        "device": p.device_name,
        "precision": p.precision,
        "usable_bytes": p.usable_bytes,
        "budget_bytes": p.budget_bytes,
        "reserve": reserve,
        "max_micro_batch": p.max_micro_batch,
        "measured_steps": p.measured_steps,
        "ddp_bucket_bytes": reserve.get("ddp_gradient_buckets", 0),
        "fixed_s": p.fixed_s,
        "per_sample_s": p.per_sample_s,
    }


# ---------------------------------------------------------------------------
# the ranks, the reference and the report (parent process)


def run_ranks(settings: Settings, record: gpu_common.Record, deadline: float | None) -> None:
    """Start the ranks and wait: until all exit, `GRACE_S` after the first failure, or the
    deadline; copies what they measured into the record (and $OUT) as it comes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, settings)) for r in range(settings.world)]
    for p in procs:
        p.start()
    failed_at, copied_at = None, 0.0
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.2)
            now = time.time()
            if now - copied_at > 5:
                record.data["ranks"] = read_reports(settings)
                record.save(results=False)
                copied_at = now
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
                codes = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode is not None}
                record.say(f"a rank failed (exit codes {codes}); the others get {GRACE_S} s")
            if failed_at is not None and now - failed_at > GRACE_S:
                break
            if deadline is not None and now > deadline:
                record.fail("the time limit was reached (--time-limit): ranks stopped")
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    record.data["exit_codes"] = [p.exitcode for p in procs]
    record.data["ranks"] = read_reports(settings)


def read_reports(settings: Settings) -> list[dict]:
    out = []
    for r in range(settings.world):
        path = pathlib.Path(settings.work_dir) / f"rank{r}.json"
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def reference_grads(settings: Settings, precision: str) -> tuple[dict[str, torch.Tensor], int]:
    """Single process, the whole first global batch in one forward and backward (in chunks
    only if that does not fit the GPU); returns the gradients and the chunk size."""
    device = torch.device("cpu" if settings.cpu else "cuda:0")
    for chunk in (GLOBAL_BATCH, 16, 4):
        grads = None
        with contextlib.suppress(torch.OutOfMemoryError):  # retry smaller, outside the handler
            grads = _reference(settings, precision, device, chunk)
        _free(device)
        if grads is not None:
            return grads, chunk
    raise CheckFailure("the single-process reference does not fit the GPU even in chunks of 4")


def _reference(
    settings: Settings, precision: str, device: torch.device, chunk: int
) -> dict[str, torch.Tensor]:
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    indices = GlobalBatchSampler(len(task.dataset), GLOBAL_BATCH, seed=SEED).global_batch()
    n_items = task.count_items(indices)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for start in range(0, len(indices), chunk):
        batch = to_device(task.batch(indices[start : start + chunk]), device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task.loss_fn(model, batch)
        (loss.float() / n_items).backward()
        del loss, batch
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}


def gradient_errors(settings: Settings, record: gpu_common.Record) -> dict[str, float]:
    saved = torch.load(f"{settings.work_dir}/grads.pt")
    record.say("reference: the first global batch in one process, uncapped")
    ref, chunk = reference_grads(settings, settings.precision)
    ref32, chunk32 = reference_grads(settings, "fp32")
    record.data["reference_chunks"] = [chunk, chunk32]
    return {
        "plan_vs_ref": rel_error(saved["grads"], ref),
        "ref_vs_fp32": rel_error(ref, ref32),
        "plan_vs_fp32": rel_error(saved["grads"], ref32),
        "plan32_vs_fp32": rel_error(saved["grads32"], ref32),
    }


def reference_params(
    settings: Settings, steps: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Single process, fp32, `steps` AdamW steps each on the whole global batch (in chunks
    only if that does not fit the GPU); the parameters after them, before them, the chunk."""
    device = torch.device("cpu" if settings.cpu else "cuda:0")
    for chunk in (GLOBAL_BATCH, 16, 4):
        found = None
        with contextlib.suppress(torch.OutOfMemoryError):  # retry smaller, outside the handler
            found = _reference_steps(settings, device, chunk, steps)
        _free(device)
        if found is not None:
            return (*found, chunk)
    raise CheckFailure("the single-process reference does not fit the GPU even in chunks of 4")


def _reference_steps(
    settings: Settings, device: torch.device, chunk: int, steps: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    start = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    opt = adamw(model)
    sampler = GlobalBatchSampler(len(task.dataset), GLOBAL_BATCH, seed=SEED)
    for _ in range(steps):
        indices = sampler.global_batch()
        n_items = task.count_items(indices)
        for at in range(0, len(indices), chunk):
            batch = to_device(task.batch(indices[at : at + chunk]), device)
            (task.loss_fn(model, batch) / n_items).backward()
            del batch
        opt.step()
        opt.zero_grad(set_to_none=True)
        sampler.advance()
    return {n: p.detach().float().cpu() for n, p in model.named_parameters()}, start


def sharded_errors(settings: Settings, record: gpu_common.Record) -> dict[str, dict[str, float]]:
    """Per mode: the sharded fp32 parameters against the reference's, and their change from
    the initial weights against the reference's change (relative L2 errors)."""
    record.say(f"reference: {EXACT_STEPS} fp32 steps on the whole global batch, one process")
    ref, start, chunk = reference_params(settings, EXACT_STEPS)
    record.data["sharded_reference_chunk"] = chunk
    out = {}
    for mode in settings.sharding:
        got = torch.load(f"{settings.work_dir}/sharded-{mode}.pt")
        moved = {n: got[n] - start[n] for n in got}
        want = {n: ref[n] - start[n] for n in ref}
        out[mode] = {"params": rel_error(got, ref), "update": rel_error(moved, want)}
    return out


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b))
    norm = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return diff / norm


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _set(values: tuple[int, ...] | list[int]) -> str:
    return ",".join(map(str, sorted(set(values)))) or "-"


def _runs(rep: dict, label: str) -> list[dict]:
    return [run for run in rep.get("runs", []) if run["label"] == label]


def report_lines(
    settings: Settings, reports: list[dict], errors: dict[str, float] | None, gpu: str
) -> list[str]:
    """The report from whatever was measured: every rank's plan row once all planned, each
    completed run, the gradient errors once computed."""
    lines = [
        f"GPU: {gpu}; torch {torch.__version__}; {settings.world} ranks on it (gloo, gradient "
        f"all-reduce staged through host memory); {settings.precision}; model "
        f"{CPU_MODEL if settings.cpu else GPU_MODEL}; global batch {GLOBAL_BATCH}; "
        f"{settings.steps} steps per run, the first {WARMUP} not timed; runs in the order "
        f"{', '.join(settings.run_order())}; {datetime.datetime.now():%Y-%m-%d %H:%M}",
    ]
    planned = len(reports) == settings.world and all("plan_json" in r for r in reports)
    if planned:
        plan = Plan.from_json(reports[0]["plan_json"])
        equal = Plan.from_json(reports[0]["equal_json"])
        lines += [
            "",
            "| rank | cap | largest micro-batch (probe) | micro-batches (plan) | accum | "
            "predicted peak (+DDP buckets) | measured peak | reserved peak | "
            "synced backwards / step | gradient buckets / step | other all-reduces / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rep in reports:
            r, prof, runs = rep["rank"], rep["profile"], _runs(rep, "plan")
            me, predicted = plan.ranks[r], prof["predicted_peak_bytes"]
            peak = max((run["peak_bytes"] for run in runs), default=None)
            reserved = max((run["reserved_bytes"] or 0 for run in runs), default=None)
            lines.append(
                f"| {r} | {_mib(rep['cap_bytes'])} | {prof['max_micro_batch']} | "
                f"{'+'.join(map(str, me.micro_batches))} | {me.accumulation_steps} | "
                f"{_mib(predicted)} ({_mib(predicted + prof['ddp_bucket_bytes'])}) | "
                f"{_mib(peak)} | {_mib(reserved if not settings.cpu else None)} | "
                f"{_set([n for run in runs for n in run['syncs_per_step']])} | "
                f"{_set([n for run in runs for n in run['buckets_per_step']])} | "
                f"{_set([n for run in runs for n in run['other_all_reduces_per_step']])} |"
            )
        lines += compute_lines(plan, reports)
        lines += [
            "",
            f"- plan: {plan.summary_lines()[0]}",
            f"- equal split: micro-batch {max(r.micro_batch_size for r in equal.ranks)} x "
            f"{max(r.accumulation_steps for r in equal.ranks)} on every rank",
        ]
    runs = reports[0].get("runs", []) if reports else []
    for i, run in enumerate(runs):
        lines.append(
            f"- run {i + 1} ({run['label']}): {run['samples_per_s']:.1f} samples/s; loss "
            f"{run['first_loss']:.3f} -> {run['last_loss']:.3f}"
        )
    speeds = {
        k: [r["samples_per_s"] for r in runs if r["label"] == k] for k in ("plan", "equal split")
    }
    if all(speeds.values()):
        plan_s, equal_s = (statistics.median(v) for v in speeds.values())
        shared = "CPU" if settings.cpu else "GPU (no MPS)"
        lines.append(
            f"- plan vs equal split on one shared {shared}: {plan_s / equal_s:.2f}x samples/s "
            f"(medians of {len(speeds['plan'])} and {len(speeds['equal split'])} runs). The "
            "ranks take turns on the one device, each computing at the same speed: this ratio "
            "measures the plans' micro-step counts and communication, not load balance across "
            "devices of different speeds."
        )
    if errors is not None:
        lines.append(
            f"- first step's gradient vs the single-process full-batch reference: relative L2 "
            f"error {errors['plan_vs_ref']:.2e} ({settings.precision} reference); the "
            f"{settings.precision} reference itself vs fp32: {errors['ref_vs_fp32']:.2e}; plan "
            f"vs fp32 reference {errors['plan_vs_fp32']:.2e}; in fp32 (a plan at a third of each "
            f"micro-batch limit, micro-batches {reports[0]['plan32_micro_batches']}) vs the fp32 "
            f"reference: {errors['plan32_vs_fp32']:.2e}"
        )
    return lines


def compute_lines(plan: Plan, reports: list[dict]) -> list[str]:
    """Per rank, in the plan's runs: the plan's predicted compute per step against the
    measured one (the median step; ComputeClock, the wait at the all-reduce left out), and
    per micro-batch size the time line's micro-step against the median measured one."""
    rows = []
    for rep in reports:
        runs = _runs(rep, "plan")
        measured = [t for run in runs for t in run.get("compute_s", [])]
        if not measured:
            continue
        me, predicted = plan.ranks[rep["rank"]], runs[0]["predicted_compute_s"]
        median = statistics.median(measured)
        sizes: dict[str, list[float]] = {}
        for run in runs:
            for b, row in run.get("micro_step_by_size", {}).items():
                sizes.setdefault(b, []).append(row["measured_s"])
        cells = "; ".join(
            f"b={b}: {me_line(plan, rep['rank'], int(b)) * 1e3:.2f} / "
            f"{statistics.median(ts) * 1e3:.2f} ms"
            for b, ts in sorted(sizes.items(), key=lambda kv: int(kv[0]))
        )
        rows.append(
            f"| {me.rank} | {'+'.join(map(str, me.micro_batches))} | {predicted * 1e3:.2f} ms | "
            f"{median * 1e3:.2f} ms ({min(measured) * 1e3:.2f}-{max(measured) * 1e3:.2f}) | "
            f"{median / predicted:.2f} | {cells} |"
        )
    if not rows:
        return []
    return [
        "",
        "| rank | micro-batches (plan) | predicted compute / step | measured compute / step "
        "(median, min-max) | measured / predicted | micro-step by size: predicted / measured |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def me_line(plan: Plan, rank: int, b: int) -> float:
    """The plan's time line for `rank`'s micro-step of b samples."""
    return plan.capacity(rank).micro_step_time(b)


def sharded_lines(
    settings: Settings, reports: list[dict], errors: dict[str, dict[str, float]] | None
) -> list[str]:
    """Per sharded mode, once every rank planned it: the table of its run, the run's speed,
    the parameters against the reference."""
    lines = []
    plan_runs = [r["samples_per_s"] for r in _runs(reports[0], "plan")] if reports else []
    for mode in settings.sharding:
        entries = [rep.get("sharded", {}).get(mode, {}) for rep in reports]
        if len(entries) < settings.world or not all("plan_json" in e for e in entries):
            continue
        plan = Plan.from_json(entries[0]["plan_json"])
        title = f"Sharded({mode!r}), FSDP2"
        if mode == "proportional":
            slices = plan.state_slices or ()
            shares = "/".join(f"{s / sum(slices):.0%}" for s in slices)
            title = f"Proportional (state shares {shares})"
        gathers, reduces = COLLECTIVE_NAMES[mode]
        lines += [
            "",
            f"{title} on the same gloo group: {plan.summary_lines()[0]}",
            "",
            "| rank | cap | largest micro-batch (sharded) | micro-batches (plan) | accum | "
            f"predicted peak | measured peak | reserved peak | {gathers} / step | "
            f"{reduces} / step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rep, entry in zip(reports, entries):
            me, run = plan.ranks[rep["rank"]], entry.get("run") or {}
            reserved = None if settings.cpu else run.get("reserved_bytes")
            lines.append(
                f"| {me.rank} | {_mib(rep['cap_bytes'])} | {me.max_micro_batch} | "
                f"{'+'.join(map(str, me.micro_batches))} | {me.accumulation_steps} | "
                f"{_mib(me.predicted_peak_bytes)} | {_mib(run.get('peak_bytes'))} | "
                f"{_mib(reserved)} | {_set(run.get('gathers_per_step', []))} | "
                f"{_set(run.get('scatters_per_step', []))} |"
            )
        lines.append("")
        run = entries[0].get("run")
        if run is not None:
            speed = "-" if run["samples_per_s"] is None else f"{run['samples_per_s']:.1f}"
            versus = ""
            if run["samples_per_s"] and plan_runs:
                ratio = run["samples_per_s"] / statistics.median(plan_runs)
                versus = f" ({ratio:.2f}x the DDP plan runs' median)"
            lines.append(
                f"- run ({settings.sharded_steps} steps, {settings.precision}): {speed} "
                f"samples/s{versus}; loss {run['first_loss']:.3f} -> {run['last_loss']:.3f}"
            )
        if errors is not None and mode in errors:
            e = errors[mode]
            lines.append(
                f"- parameters after {EXACT_STEPS} fp32 steps (a plan at a third of each sharded "
                f"limit, micro-batches {entries[0]['plan32_micro_batches']}) vs the "
                f"single-process full-batch reference: relative L2 error {e['params']:.2e}; "
                f"of their change from the initial weights: {e['update']:.2e}"
            )
    return lines


def sharded_verdict(
    settings: Settings, reports: list[dict], errors: dict[str, dict[str, float]]
) -> list[str]:
    """The sharded checks: FSDP2's collectives per step as the mode issues them, no peak
    above the plan's prediction (+PEAK_SLACK), the fp32 parameters' change equal to the
    reference's."""
    bad = []
    for mode in settings.sharding:
        for rep in reports:
            entry = rep["sharded"][mode]
            me = Plan.from_json(entry["plan_json"]).ranks[rep["rank"]]
            run, who = entry["run"], f"rank {rep['rank']} {mode}"
            want = expected_collectives(
                mode, entry["blocks"], me.accumulation_steps, tuple(run.get("unit_owners", ()))
            )
            got = set(zip(run["gathers_per_step"], run["scatters_per_step"]))
            if got != {want}:
                names = ", ".join(COLLECTIVE_NAMES[mode])
                bad.append(f"{who}: ({names}) per step {got}, not {want}")
            if run["peak_bytes"] > (1 + PEAK_SLACK) * me.predicted_peak_bytes:
                bad.append(
                    f"{who}: measured peak {_mib(run['peak_bytes'])} above the predicted "
                    f"{_mib(me.predicted_peak_bytes)} (+{PEAK_SLACK:.0%})"
                )
        if errors[mode]["update"] > UPDATE_TOLERANCE:
            bad.append(f"{mode}: fp32 parameters' change, relative error > {UPDATE_TOLERANCE:g}")
    return bad


def verdict(reports: list[dict], errors: dict[str, float]) -> list[str]:
    """The checks that must hold; empty when all do."""
    bad = []
    for rep in reports:
        for run in rep["runs"]:
            if set(run["syncs_per_step"]) != {1} or set(run["other_all_reduces_per_step"]) != {0}:
                bad.append(
                    f"rank {rep['rank']} {run['label']}: not exactly one gradient all-reduce"
                )
    if errors["plan_vs_ref"] > max(1e-4, 2 * errors["ref_vs_fp32"]):
        bad.append(f"{reports[0]['profile']['precision']} gradient error above its own noise")
    if errors["plan32_vs_fp32"] > 1e-5:
        bad.append("fp32 gradient error > 1e-5")
    return bad


def rank_failures(settings: Settings, reports: list[dict], codes: list[int | None]) -> list[str]:
    """One line per rank that did not finish: its error and phase, or how it ended; the
    likely cause first (`cause_order`; the clock only between errors of one order: peers
    that lost their collective may record theirs in the same tenth of a second)."""
    out = []  # (cause order, when, rank, line)
    unknown = policy.ROOT_ORDER["lost"]  # a record without a cause: as a broken collective
    by_rank = {rep["rank"]: rep for rep in reports}
    for r in range(settings.world):
        rep, code = by_rank.get(r), codes[r] if r < len(codes) else None
        if rep is not None and rep["done"]:
            continue
        if rep is None:
            line = f"rank {r}: exit code {code}, nothing recorded (it died while starting)"
            out.append((math.inf, math.inf, r, line))
        elif rep["error"]:
            e = rep["error"]
            line = f"rank {r} in {e['phase']} at +{e['at_s']} s: {e['error']}"
            out.append((e.get("cause", unknown), e["at_s"], r, line))
        else:
            line = (
                f"rank {r} in {rep['current']}: exit code {code}, no error of its own recorded "
                "(killed: a signal, the time limit, or after another rank's failure)"
            )
            out.append((math.inf, math.inf, r, line))
    return [line for *_, line in sorted(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps-gib", type=float, nargs="+", default=[4.0, 2.5, 1.5])
    parser.add_argument("--steps", type=int, help="per run (default 30; 10 with --cpu)")
    parser.add_argument("--rounds", type=int, default=2, help="of plan and equal split runs")
    parser.add_argument("--time-limit", type=float, help="seconds: then stop and report")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--cpu", action="store_true", help="functional check without a GPU")
    parser.add_argument("--caps-mib", type=float, nargs="+", default=[32.0, 12.0, 8.0])
    parser.add_argument(
        "--plant-failure", type=int, metavar="RANK", help="RANK fails in the second run"
    )
    parser.add_argument(
        "--sharding",
        nargs="*",
        choices=CHECK_MODES,
        default=list(CHECK_MODES),
        metavar="MODE",
        help="sharded modes to run after the DDP runs: optimizer, full (FSDP2), proportional "
        "(default all three; none given: none)",
    )
    parser.add_argument("--sharded-steps", type=int, default=8, help="per sharded run")
    parser.add_argument(
        "--fsdp-collectives",
        choices=("staged", "direct"),
        help="FSDP2's all-gathers and reduce-scatters through host memory (default on a GPU) "
        "or gloo on the device's tensors (default with --cpu)",
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (10 if args.cpu else 30)
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps must be > {WARMUP + 1}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.sharded_steps < 1:
        parser.error("--sharded-steps must be >= 1")
    world = len(args.caps_mib if args.cpu else args.caps_gib)
    if args.plant_failure is not None and not 0 <= args.plant_failure < world:
        parser.error(f"--plant-failure {args.plant_failure}: a rank in 0..{world - 1}")
    return args


def check(args: argparse.Namespace, record: gpu_common.Record, state: dict[str, Any]) -> None:
    """The check; what it measures lands in `state` and `record` as it comes."""
    if not args.cpu and not torch.cuda.is_available():
        record.fail("no CUDA device: this check needs an NVIDIA GPU (or --cpu)")
        return
    if not args.cpu:
        smi = gpu_common.nvidia_smi()
        record.data["nvidia_smi"] = smi
        for g in smi:
            record.say(
                f"nvidia-smi: GPU {g['index']}: {g['name']}, compute mode "
                f"{g['compute_mode']}, {g['memory.total']}, driver {g['driver_version']}"
            )
        if smi and "exclusive" in smi[0]["compute_mode"].lower():
            record.fail(
                f"GPU 0's compute mode is {smi[0]['compute_mode']}: the 3 ranks cannot share "
                "it; this check needs the Default compute mode"
            )
            return
    bf16 = args.cpu or torch.cuda.is_bf16_supported()
    sharding = tuple(dict.fromkeys(args.sharding))
    if not bf16 and "proportional" in sharding:
        sharding = tuple(m for m in sharding if m != "proportional")
        record.say("proportional left out: this GPU has no bf16, and it refuses fp16")
    caps = [c * 2**20 for c in args.caps_mib] if args.cpu else [c * 2**30 for c in args.caps_gib]
    if not args.cpu and sum(caps) > 0.8 * torch.cuda.get_device_properties(0).total_memory:
        record.fail(f"--caps-gib {args.caps_gib} do not fit this GPU with room for 3 contexts")
        return
    settings = Settings(
        caps_bytes=tuple(int(c) for c in caps),
        steps=args.steps,
        rounds=args.rounds,
        cpu=args.cpu,
        precision="bf16" if bf16 else "fp16",
        port=free_port(),
        work_dir=tempfile.mkdtemp(prefix="gpu_check-"),
        t0=record.t0,
        plant_failure=args.plant_failure,
        sharding=sharding,
        sharded_steps=args.sharded_steps,
        staged_fsdp=(args.fsdp_collectives or ("direct" if args.cpu else "staged")) == "staged",
    )
    state["settings"] = settings
    record.data["settings"] = asdict(settings)
    record.say(
        f"{settings.world} ranks, caps {[_mib(c) for c in settings.caps_bytes]}, "
        f"{settings.precision}; work directory {settings.work_dir}"
    )
    deadline = None if args.time_limit is None else record.t0 + args.time_limit
    run_ranks(settings, record, deadline)
    reports = record.data["ranks"]
    for line in rank_failures(settings, reports, record.data["exit_codes"]):
        record.fail(line)
    if not record.failures:
        state["errors"] = gradient_errors(settings, record)
        if settings.sharding:
            state["sharded_errors"] = sharded_errors(settings, record)


def compose(record: gpu_common.Record, state: dict[str, Any]) -> None:
    """The report's lines from whatever was measured (also after a failure)."""
    settings: Settings | None = state.get("settings")
    if settings is None:
        return
    reports = sorted(record.data.get("ranks", []), key=lambda r: r["rank"])
    errors = state.get("errors")
    gpu = next((r["device"] for r in reports if "device" in r), "?")
    smi = record.data.get("nvidia_smi")
    if settings.cpu:
        gpu = "CPU (functional check, --cpu)"
    elif smi:
        gpu += f" (nvidia-smi: compute mode {smi[0]['compute_mode']}, {smi[0]['memory.total']})"
    lines = report_lines(settings, reports, errors, gpu)
    sharded = state.get("sharded_errors")
    lines += sharded_lines(settings, reports, sharded)
    chunks = record.data.get("reference_chunks")
    if chunks and chunks != [GLOBAL_BATCH, GLOBAL_BATCH]:
        lines.append(
            f"- the reference ran in chunks of {chunks[0]} ({settings.precision}) and "
            f"{chunks[1]} (fp32) samples: the full batch did not fit the GPU"
        )
    if errors is not None:
        for bad in verdict(reports, errors):
            record.fail(bad)
    if sharded is not None:
        for bad in sharded_verdict(settings, reports, sharded):
            record.fail(bad)
    status = "all passed" if not record.failures else "FAILED (below)"
    lines.append(f"- checks: {status}; total {time.time() - record.t0:.0f} s")
    for line in lines:
        record.note(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = gpu_common.Record("gpu_check", TITLE)
    state: dict[str, Any] = {}
    signal.signal(signal.SIGTERM, gpu_common.raise_time_limit)
    try:
        check(args, record, state)
    except BaseException as exc:  # the time limit, an interrupt, an error in the parent
        record.fail(f"parent: {gpu_common.error_line(exc)}")
        record.data["parent_traceback"] = traceback.format_exc()[-4000:]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        compose(record, state)
        written = record.save(results=not (args.cpu or args.no_write))
        settings = state.get("settings")
        if settings is not None and not record.failures:
            shutil.rmtree(settings.work_dir, ignore_errors=True)
        elif settings is not None:
            print(f"kept the work directory {settings.work_dir}", file=sys.stderr)
        print(f"written: {', '.join(map(str, written)) or 'nothing (no OUT, --cpu)'}")
    return 1 if record.failures else 0


if __name__ == "__main__":
    sys.exit(main())
