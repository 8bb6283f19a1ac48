"""The training loop of one rank: plan sampler -> micro-batches -> accumulator -> optimizer.

Per optimizer step the rank takes its micro-batches from the plan sampler (or,
for variable-length data, its packed share), runs the accumulator's step, and
on an out-of-memory in a no_sync micro-step (agreed by every rank) asks the
failure policy, which lowers that device's micro-batch: the same global batch is
retried in place. Rank 0 checkpoints. Restarts and re-plans after a lost worker
are the runner's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from autobatch.errors import LaunchError
from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.packing import pack_global_batch, token_budgets
from autobatch.planning.plan import Plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.probe.measure import to_device
from autobatch.probe.simulated import Pacer, TensorMemory
from autobatch.step.accumulate import Accumulator, LossFn
from autobatch.step.wrap import REPLICATED
from launcher.job import policy
from launcher.job.checkpoint import load_checkpoint, save_checkpoint
from launcher.job.context import RankContext, RankOutcome
from launcher.job.optim import build_optimizer, build_schedule
from launcher.job.rankstats import RankStats
from launcher.job.tasks import load_task


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

    def trim(self, step: int, indices: list) -> list:
        """`short_batch`: this rank drops the last sample of its step (a planted bug)."""
        for f in [f for f in self.pending if f.kind == "short_batch" and f.step == step]:
            self.pending.remove(f)
            last = list(indices[-1])[:-1]
            indices = [*indices[:-1], last] if last else indices[:-1]
        return indices

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
    if plan.capacity(ctx.rank).gradient_checkpointing:
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
    acc = Accumulator(
        REPLICATED.wrap(model, device),
        optimizer,
        max_grad_norm=spec.optimizer.max_grad_norm,
        precision=ctx.precision,
        agree_on_oom=True,
        wrapping=REPLICATED,
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
    stats = RankStats(ctx, plan, max_len)
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
        indices = faults.trim(sampler.step, indices)
        batches = [task.batch(idx) for idx in indices]  # moved to the device one at a time
        n_items = task.count_items(sampler.global_batch())

        def stand_in(first: int = int(indices[-1][0])) -> Any:
            return task.batch([first])

        if memory is not None:
            memory.limit_bytes = ctx.device.total_bytes if stats.steps >= 2 or world == 1 else None
        with memory if memory is not None else contextlib.nullcontext():
            result = acc.step(
                batches,
                loss_fn,
                global_items=n_items,
                oom_stand_in=stand_in,
                local_samples=sum(len(idx) for idx in indices),  # measured, summed over ranks
                expected_samples=spec.global_batch_size,
            )
        if result.refused:
            stats.on_step(result, 0.0, plan, indices, lengths_of, memory, device)
            push(stats.snapshot())
            raise LaunchError(
                f"step {sampler.step}: the ranks processed {result.global_samples} samples, "
                f"not the global batch of {spec.global_batch_size}: the step was refused "
                "(no optimizer update)"
            )
        if result.oom:
            plan = _retry_plan(plan, _ranks_that(result.oom_here, world), sampler.step)
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


def _ranks_that(flag: bool, world: int) -> list[int]:
    """Every rank learns which ranks raised the flag (one small all-gather, OOM path only)."""
    if world == 1:
        return [0] if flag else []
    flags = torch.zeros(world, dtype=torch.int32)
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return [r for r in range(world) if flags[r]]


def _retry_plan(plan: Plan, oom_ranks: list[int], step: int) -> Plan:
    """The plan to retry the same global batch on, after `oom_ranks` ran out of memory in a
    no_sync micro-step (every rank agreed to drop the step); the policy decides."""
    failures = [
        policy.RankFailure(r, "oom_no_sync", f"rank {r}: out of memory at step {step}")
        for r in oom_ranks
    ]
    decision = policy.decide(failures, restarts=0, max_restarts=0, plan=plan)
    if decision.action != "retry_in_place":
        raise LaunchError(decision.reason)
    return decision.plan
