"""What runs on each device: the probe, and the training loop of one rank.

The training loop is a plain function (`train_rank`) so the actor stays thin:
per optimizer step it takes the rank's micro-batches from the plan sampler,
runs the accumulator, and on an out-of-memory in a no_sync micro-step (agreed
by every rank) lowers that device's micro-batch and retries the same global
batch. Rank 0 checkpoints. Everything else (restarts, re-plans after a lost
worker, the progress bar) is the runner's job.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.errors import LaunchError
from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.packing import pack_global_batch, padding_waste, token_budgets
from autobatch.planning.plan import DeviceCapacity, Plan
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.probe.devices import DeviceInfo, SimulatedDevice, inventory
from autobatch.probe.measure import to_device
from autobatch.probe.profile import ModelProfile, profile_model
from autobatch.probe.simulated import Pacer, TensorMemory
from autobatch.step.accumulate import Accumulator, LossFn, StepResult
from launcher.job.checkpoint import load_checkpoint, save_checkpoint
from launcher.job.spec import JobSpec, OptimizerSpec, ScheduleSpec
from launcher.job.tasks import load_task

PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=120)


@dataclass(frozen=True)
class RankContext:
    """Everything one rank needs to train; built by the runner, sent to the actor."""

    job: str
    spec: JobSpec
    plan_json: str
    rank: int
    device: DeviceInfo
    node: str
    checkpoint_dir: str
    output_dir: str | None
    resume_from: str | None
    attempt: int
    speed: float = 1.0  # simulated devices: relative to this machine (at most 1)
    backward_factor: float = 3.0
    restarts: int = 0
    replans: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    steps_done: int
    final_plan_json: str
    oom_events: int
    checkpoint: str | None
    parameters: dict[str, torch.Tensor] | None = None  # rank 0 only, for invariance checks
    output: str | None = None  # rank 0: where the task saved the trained model


# ---------------------------------------------------------------------------
# building blocks


def build_optimizer(spec: OptimizerSpec) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        if spec.name == "adamw":
            return torch.optim.AdamW(
                model.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
            )
        return torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )

    return make


def build_schedule(
    spec: ScheduleSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    def factor(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
        if spec.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if spec.name == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_device(device: DeviceInfo | SimulatedDevice | None, index: int) -> DeviceInfo:
    """The device this process trains on: a simulated one, or this process's GPU (or CPU)."""
    if isinstance(device, SimulatedDevice):
        return device.info(index)
    if device is not None:
        return device
    found = [d for d in inventory() if d.torch_device is not None]
    return found[0]


def probe(spec: JobSpec, device: DeviceInfo, cache_dir: str | None) -> ModelProfile:
    task = load_task(spec)
    torch.manual_seed(spec.seed)
    return profile_model(
        task,
        device,
        make_optimizer=build_optimizer(spec.optimizer),
        precision=spec.precision,
        headroom_fraction=spec.memory_headroom,
        distributed=True,
        cache_dir=cache_dir,
        gradient_checkpointing=None,  # on where micro-batch 1 does not fit without it
    )


def lower_micro_batches(plan: Plan, ranks: list[int]) -> Plan:
    """The plan after `ranks` ran out of memory: their limit drops to 3/4 of the micro-batch
    that failed (at least one less), the same global batch is re-split over the same ranks."""
    by_id = {r.device_id: r for r in plan.ranks}
    inputs = []
    for d in plan.inputs:
        if d.device_id not in by_id:
            continue
        r = by_id[d.device_id]
        if r.rank in ranks:
            if r.micro_batch_size <= 1:
                raise LaunchError(
                    f"rank {r.rank} ({d.name}) ran out of memory at micro-batch 1: it cannot "
                    "train this model; remove the device or lower the sequence length"
                )
            d = replace(
                d, max_micro_batch=min(r.micro_batch_size - 1, r.micro_batch_size * 3 // 4) or 1
            )
        inputs.append(d)
    return make_plan(plan.global_batch_size, inputs, keep_all=True)


# ---------------------------------------------------------------------------
# the training loop of one rank


class _Faults:
    """Injected faults of the job spec that concern this rank (first attempt only)."""

    def __init__(self, ctx: RankContext) -> None:
        self.pending = (
            [f for f in ctx.spec.faults if f.rank == ctx.rank] if ctx.attempt == 0 else []
        )

    def before_step(self, step: int) -> None:
        for f in self.pending:
            if f.kind == "crash" and f.step == step:
                os.kill(os.getpid(), 9)  # a real kill -9 of this worker process

    def wrap(
        self, loss_fn: LossFn, step_of: Callable[[], int], n_micro: Callable[[], int]
    ) -> LossFn:
        calls = {"step": -1, "i": 0}

        def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            step = step_of()
            if calls["step"] != step:
                calls.update(step=step, i=0)
            calls["i"] += 1
            for f in list(self.pending):
                if f.kind == "oom" and f.step == step:
                    i = 1 if f.micro_step == "first" else n_micro()
                    if calls["i"] == i:
                        self.pending.remove(f)
                        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")
            return loss_fn(model, batch)

        return loss


def train_rank(ctx: RankContext, push: Callable[[RankSnapshot], None]) -> RankOutcome:
    spec = ctx.spec
    world = dist.get_world_size() if dist.is_initialized() else 1
    plan = Plan.from_json(ctx.plan_json)
    device = torch.device(ctx.device.torch_device or "cpu")
    task = load_task(spec)
    torch.manual_seed(spec.seed)
    model = task.build_model().to(device)
    if _capacity(plan, ctx.rank).gradient_checkpointing:
        task.checkpoint_activations(model)
    optimizer = build_optimizer(spec.optimizer)(model)
    sampler = GlobalBatchSampler(
        len(task.dataset), spec.global_batch_size, seed=spec.seed, epoch_end=spec.epoch_end
    )
    total = spec.total_steps(sampler.steps_per_epoch)
    schedule = build_schedule(spec.schedule, optimizer, total)
    state = load_checkpoint(ctx.resume_from) if ctx.resume_from else None
    if state is not None:
        sampler.check_resume(state["sampler"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.step = state["sampler"]["step"]
    wrapped = model
    if world > 1:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    acc = Accumulator(
        wrapped,
        optimizer,
        max_grad_norm=spec.optimizer.max_grad_norm,
        precision=spec.precision,
        agree_on_oom=True,
    )
    if state is not None and acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])  # fp16: resume with the scale it had

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        # One micro-batch on the device at a time, as the probe measured it.
        return task.loss_fn(model, to_device(batch, device))

    # A simulated device enforces its memory from the attempt's third step on: DDP
    # rebuilds its gradient buckets once, with a broadcast inside the first forward
    # after the first synced backward; an out-of-memory raised there on one rank
    # would skip that broadcast and leave the ranks in different collectives.
    memory = None
    if ctx.device.simulated:
        pacer = Pacer(ctx.speed, backward_factor=ctx.backward_factor)
        loss_fn = pacer.wrap_loss_fn(loss_fn)
        pacer.attach(optimizer)
        memory = TensorMemory(ctx.device.total_bytes, model=model, optimizer=optimizer)
    faults = _Faults(ctx)
    loss_fn = faults.wrap(loss_fn, lambda: sampler.step, lambda: len(indices))

    max_len = task.max_length() if task.sample_length else None
    stats = _Stats(ctx, plan, max_len)
    audit = _Audit(ctx) if spec.audit_samples else None
    last_ckpt = ctx.resume_from
    while sampler.step < total:
        faults.before_step(sampler.step)
        t0 = time.perf_counter()
        lengths_of = None
        if max_len is None:
            indices = sampler.micro_batches(plan, ctx.rank)
        else:  # variable-length sequences: a time-balanced split, packed by tokens
            global_batch = sampler.global_batch()
            lengths = task.lengths(global_batch)
            packed = pack_global_batch(global_batch, lengths, token_budgets(plan, max_len))
            indices = packed[ctx.rank]
            lengths_of = dict(zip(map(int, global_batch), lengths))
        batches = [task.batch(idx) for idx in indices]  # moved to the device one at a time
        n_items = task.count_items(sampler.global_batch())

        def stand_in(first: int = int(indices[-1][0])) -> Any:
            return task.batch([first])

        if memory is not None:
            memory.limit_bytes = ctx.device.total_bytes if stats.steps >= 2 or world == 1 else None
            with memory:
                result = acc.step(batches, loss_fn, global_items=n_items, oom_stand_in=stand_in)
        else:
            result = acc.step(batches, loss_fn, global_items=n_items, oom_stand_in=stand_in)
        if result.oom:
            plan = lower_micro_batches(plan, _ranks_that(result.oom_here, world))
            stats.on_oom(result.oom_here, plan)
            continue  # the same global batch, on the lowered plan
        if audit is not None:
            audit.record(sampler.step, indices)
        schedule.step()
        sampler.advance()
        stats.on_step(result, time.perf_counter() - t0, plan, indices, lengths_of, memory, device)
        push(stats.snapshot())
        if ctx.rank == 0 and (
            sampler.step % spec.checkpoint.interval == 0 or sampler.step == total
        ):
            last_ckpt = str(
                save_checkpoint(
                    ctx.checkpoint_dir,
                    sampler.step,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "sampler": sampler.state().to_dict(),
                        "plan": plan.to_json(),
                        "job": ctx.job,
                        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    },
                )
            )
    params = output = None
    if ctx.rank == 0:
        params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if task.save is not None and ctx.output_dir:
            task.save(model, ctx.output_dir)
            output = ctx.output_dir
    return RankOutcome(
        ctx.rank, sampler.step, plan.to_json(), stats.oom_events, last_ckpt, params, output
    )


class _Audit:
    def __init__(self, ctx: RankContext) -> None:
        d = pathlib.Path(ctx.checkpoint_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"samples-rank{ctx.rank}.jsonl"
        self.attempt = ctx.attempt

    def record(self, step: int, micro_batches: list) -> None:
        line = {
            "attempt": self.attempt,
            "step": step,
            "micro_batches": [[int(i) for i in mb] for mb in micro_batches],
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _capacity(plan: Plan, rank: int) -> DeviceCapacity:
    by_id = {d.device_id: d for d in plan.inputs}
    return by_id[plan.ranks[rank].device_id]


def _ranks_that(flag: bool, world: int) -> list[int]:
    """Every rank learns which ranks raised the flag (one small all-gather, OOM path only)."""
    if world == 1:
        return [0] if flag else []
    flags = torch.zeros(world, dtype=torch.int32)
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return [r for r in range(world) if flags[r]]


class _Stats:
    """Counters and the last step's figures of one rank, as metrics snapshots."""

    def __init__(self, ctx: RankContext, plan: Plan, max_len: int | None) -> None:
        self.ctx, self.plan, self.max_len = ctx, plan, max_len
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.oom_events = 0
        self.replans = dict(ctx.replans)
        self.last: dict[str, Any] = {}
        self.durations: list[float] = []

    def on_oom(self, here: bool, plan: Plan) -> None:
        self.oom_events += int(here)
        self.replans["oom"] = self.replans.get("oom", 0) + 1
        self.plan = plan

    def on_step(
        self,
        result: StepResult,
        seconds: float,
        plan: Plan,
        micro_batches: list,
        lengths_of: dict[int, int] | None,
        memory: TensorMemory | None,
        device: torch.device,
    ) -> None:
        self.plan = plan
        sizes = [len(mb) for mb in micro_batches]
        self.steps += 1
        self.samples += sum(sizes)
        self.tokens += result.global_items if self.ctx.rank == 0 else 0
        self.durations.append(seconds)
        peak = allocated = reserved = None
        if memory is not None:
            peak = memory.peak_bytes
        elif device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            allocated = torch.cuda.memory_allocated(device)
            reserved = torch.cuda.memory_reserved(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.last = {
            "loss": result.loss,
            "seconds": seconds,
            "peak": peak,
            "allocated": allocated,
            "reserved": reserved,
            "sync_wait": _sync_wait(
                result, plan, self.ctx.rank, _work(micro_batches, lengths_of, self.max_len)
            ),
            "sizes": sizes,
            "padding": None if lengths_of is None else padding_waste(micro_batches, lengths_of),
        }

    def snapshot(self) -> RankSnapshot:
        me = self.plan.ranks[self.ctx.rank]
        durations, self.durations = tuple(self.durations), []
        return RankSnapshot(
            job=self.ctx.job,
            rank=self.ctx.rank,
            node=self.ctx.node,
            device=self.ctx.device.name,
            device_uuid=self.ctx.device.uuid,
            simulated=self.ctx.device.simulated,
            device_memory_total_bytes=self.ctx.device.total_bytes,
            torch_memory_allocated_bytes=self.last["allocated"],
            torch_memory_reserved_bytes=self.last["reserved"],
            torch_memory_peak_bytes=self.last["peak"],
            plan_predicted_peak_bytes=me.predicted_peak_bytes,
            micro_batch_size=max(self.last["sizes"]),
            accumulation_steps=len(self.last["sizes"]),
            rank_samples_per_step=sum(self.last["sizes"]),
            global_batch_size=self.plan.global_batch_size,
            effective_global_batch_size=sum(r.samples for r in self.plan.ranks),
            plan_efficiency_ratio=self.plan.efficiency,
            step_duration_s=self.last["seconds"],
            sync_wait_s=self.last["sync_wait"],
            train_loss=self.last["loss"],
            padding_waste_ratio=self.last["padding"],
            step_durations_s=durations,
            samples_processed_total=self.samples,
            tokens_processed_total=self.tokens,
            optimizer_steps_total=self.steps,
            oom_events_total=self.oom_events,
            worker_restarts_total=self.ctx.restarts,
            replans_total=self.replans,
        )


def _work(
    micro_batches: list, lengths_of: dict[int, int] | None, max_len: int | None
) -> list[float]:
    """Each micro-batch's work in samples of the plan's worst case: its sample count, or
    for packed sequences its padded tokens / the longest sequence the job allows."""
    if lengths_of is None or max_len is None:
        return [float(len(mb)) for mb in micro_batches]
    return [len(mb) * max(lengths_of[i] for i in mb) / max_len for mb in micro_batches]


def _sync_wait(result: StepResult, plan: Plan, rank: int, work: list[float]) -> float | None:
    """Time the synced micro-step took beyond this rank's own compute for it: the wait for
    the slowest rank at the all-reduce. Its compute is the plan's time model for it, scaled
    by how this step's no_sync micro-steps compared with the same model."""
    times = result.micro_step_s
    if not times:
        return None
    model = _capacity(plan, rank).micro_step_time
    expected = model(work[-1])
    if len(times) > 1:
        expected *= sum(times[:-1]) / sum(model(w) for w in work[:-1])
    return max(0.0, times[-1] - expected)
