"""The training loop of one rank: plan sampler -> micro-batches -> accumulator -> optimizer.

Per optimizer step the rank takes its micro-batches (the plan sampler's, or for
variable-length data its packed share) from a DataLoader whose workers collate
them ahead of time (`autobatch.tasks.loader.StepLoader`, `data_workers` of the
spec), runs the accumulator's step, and on an out-of-memory in a no_sync
micro-step (agreed by every rank) asks the failure policy, which lowers that
device's micro-batch: the same global batch is retried in place, from a loader
rebuilt for the lowered plan. The model is wrapped as the plan's sharding says
(`autobatch.step.wrap.wrapping_for`: DDP, or FSDP2), and the wrapping saves, loads
and gathers it (a replica's file, or a sharded model's shards). Every rebalance
window the ranks share their measured compute and may switch, together and
between two steps, to a new split of the same global batch (closed-loop balance,
`launcher.job.rebalancing`). Checkpoints are copied to host memory and written in the
background (`checkpoint.async`, launcher.job.checkpoint): the next save, the end of the
attempt and a stop for a resize wait for the write in flight. Restarts and re-plans after
a lost worker are the runner's. Injected faults are `launcher.job.faults`.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from autobatch.errors import LaunchError
from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.plan import Plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.probe.measure import to_device
from autobatch.probe.simulated import Pacer, TensorMemory
from autobatch.step import storage
from autobatch.step.accumulate import Accumulator, LossFn, StepResult
from autobatch.step.background import PendingSave
from autobatch.step.collective import collective_device
from autobatch.step.wrap import held_module, wrapping_for
from autobatch.tasks.loader import StepBatches, StepLoader, default_num_workers
from launcher.job import policy
from launcher.job.audit import AuditLedger
from launcher.job.checkpoint import begin_checkpoint, restore_checkpoint
from launcher.job.context import RankContext, RankOutcome
from launcher.job.faults import Faults
from launcher.job.optim import build_optimizer, build_schedule
from launcher.job.rankstats import RankStats
from launcher.job.rebalancing import ComputeClock, Rebalancer
from launcher.job.tasks import load_task

# With an error in flight, how long a rank waits for its checkpoint write to finish (the
# runner kills the ranks ranks.FAILURE_GRACE_S after the first failure in any case).
SETTLE_S = 10.0


def train_rank(
    ctx: RankContext,
    push: Callable[[RankSnapshot], None],
    stop_requested: Callable[[], bool] | None = None,
) -> RankOutcome:
    """Train from the context's checkpoint to the last step, or (elastic jobs) until rank 0's
    `stop_requested` says so after a step: then every rank checkpoints that step and returns
    (the runner resizes the job and resumes there)."""
    rank = _Rank(ctx)
    try:
        while rank.sampler.step < rank.total:
            rank.faults.before_step(rank.sampler.step, settle=rank.settle_quietly)
            rank.rebalance_if_due()  # between two steps, on every rank alike
            t0 = time.perf_counter()
            indices, batches, lengths_of = rank.share()
            if rank.audit is not None:
                rank.audit.record(rank.sampler.step, indices)
            result = rank.step(indices, batches)
            if result.refused:
                push(rank.record(result, 0.0, indices, lengths_of))
                raise LaunchError(
                    f"step {rank.sampler.step}: the ranks processed {result.global_samples} "
                    f"samples, not the global batch of {ctx.spec.global_batch_size}: the step "
                    "was refused (no optimizer update)"
                )
            if result.oom:
                oom_ranks = _ranks_that(result.oom_here)
                rank.replan(policy.retry_in_place(rank.plan, oom_ranks, rank.sampler.step))
                rank.stats.on_oom(result.oom_here, rank.plan)
                continue  # the same global batch, on the lowered plan
            rank.schedule.step()
            rank.sampler.advance()
            push(rank.record(result, time.perf_counter() - t0, indices, lengths_of))
            rank.checkpoint_if_due()
            more = rank.sampler.step < rank.total
            if stop_requested is not None and more and rank.stop_agreed(stop_requested):
                rank.checkpoint()
                rank.settle_checkpoint()  # complete before the runner resizes from it
                return rank.outcome(stopped=True)
        rank.settle_checkpoint()  # the last one complete (or its error) before the outcome
    finally:
        if sys.exc_info()[0] is not None:
            rank.settle_quietly()  # a write in flight finishes if it can: a peer's death
        rank.close_data()
        rank.clock.close()
        if rank.audit is not None:  # an object store's segment of the attempt's last steps
            rank.audit.flush(quiet=sys.exc_info()[0] is not None)
    return rank.outcome()


class _Rank:
    """One rank's training state: model, optimizer, schedule, sampler, accumulator, and the
    simulated device's memory and pace; built (and resumed) once per attempt."""

    def __init__(self, ctx: RankContext) -> None:
        spec = self.spec = ctx.spec
        self.ctx = ctx
        self.plan = Plan.from_json(ctx.plan_json)
        self.device = torch.device(ctx.device.torch_device or "cpu")
        self.task = task = load_task(spec)
        torch.manual_seed(spec.seed)
        self.model = task.build_model().to(self.device)
        if self.plan.capacity(ctx.rank).gradient_checkpointing:
            task.checkpoint_activations(self.model)
        # Wrapped before the optimizer is built: a sharded model's parameters are DTensors.
        self.wrapping = wrapping_for(self.plan.sharding, slices=self.plan.state_slices)
        self.wrapping.check_plan([r.accumulation_steps for r in self.plan.ranks])
        wrapped = self.wrapping.wrap(self.model, self.device)
        self.model = held_module(wrapped)  # proportional: the module holding this rank's slice
        self.optimizer = build_optimizer(spec.optimizer)(self.model)
        self.sampler = GlobalBatchSampler(
            len(task.dataset), spec.global_batch_size, seed=spec.seed, epoch_end=spec.epoch_end
        )
        self.total = spec.total_steps(self.sampler.steps_per_epoch)
        self.schedule = build_schedule(spec.schedule, self.optimizer, self.total)
        state = self._resume(ctx.resume_from) if ctx.resume_from else None
        self.acc = Accumulator(
            wrapped,
            self.optimizer,
            max_grad_norm=spec.optimizer.max_grad_norm,
            precision=ctx.precision,
            # An OOM inside a sharded forward can stop between its all-gathers: the ranks
            # cannot agree to retry in place; the runner restarts them with a lower plan.
            agree_on_oom=self.wrapping.retries_oom_in_place,
            wrapping=self.wrapping,
        )
        if state is not None and self.acc.scaler is not None and state.get("scaler"):
            self.acc.scaler.load_state_dict(state["scaler"])  # fp16: the scale it had
        self.last_checkpoint = ctx.resume_from
        self.saving: PendingSave | None = None  # the checkpoint being written, if any
        self._saved_step = self.sampler.step if ctx.resume_from else -1
        self.faults = Faults(ctx)
        self.loss_fn, self.memory = self._device_loss()
        self.clock = ComputeClock(self.model, self.device)  # after wrapping: its parameters
        self.loss_fn = self.faults.wrap(
            self.clock.wrap(self.loss_fn), lambda: self.sampler.step, self._n_micro
        )
        self.rebalancer = Rebalancer.of(spec, state.get("rebalances", []) if state else ())
        self.max_len = task.max_length() if task.sample_length else None
        self.stats = RankStats(ctx, self.plan, self.max_len, start_step=self.sampler.step)
        self.audit = AuditLedger(ctx) if spec.audit_samples else None
        self._indices: list = []
        self.data_workers = (
            spec.data_workers
            if spec.data_workers is not None
            else default_num_workers(ctx.ranks_on_node)
        )
        self._data: StepLoader | None = None  # built at the current step on first use

    def _resume(self, path: str) -> dict:
        """Load the checkpoint at `path` (a replica's file, or a sharded checkpoint's
        directory, whatever the world size that saved it); returns its training state."""
        state = restore_checkpoint(path, self.wrapping, self.model, self.optimizer)
        self.sampler.check_resume(state["sampler"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.step = state["sampler"]["step"]
        return state

    def _device_loss(self) -> tuple[LossFn, TensorMemory | None]:
        """The task's loss with its micro-batch moved to the device (one at a time, as the
        probe measured it); on a simulated device also paced, and its memory enforced."""
        task, device = self.task, self.device

        def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            return task.loss_fn(model, to_device(batch, device))

        simulated = self.ctx.device.simulated
        if not simulated and not self.faults.slows:
            return loss_fn, None
        speed = self.ctx.speed if simulated else 1.0  # a real device slowed by a drill
        pacer = self.faults.pacer = Pacer(speed, backward_factor=self.ctx.backward_factor)
        pacer.attach(self.optimizer)
        limit = self.ctx.device.total_bytes
        memory = (
            TensorMemory(limit, model=self.model, optimizer=self.optimizer) if simulated else None
        )
        return pacer.wrap_loss_fn(loss_fn), memory

    def _n_micro(self) -> int:
        return len(self._indices)

    def replan(self, plan: Plan) -> None:
        """Train on `plan` from the current step: the loader of the old plan is closed (with
        what it prefetched) and a new one starts at the current step on first use."""
        self.plan = plan
        self.rebalancer.restart_window()
        self.close_data()

    def rebalance_if_due(self) -> None:
        """Every rebalance window: the ranks' measured compute shared, and the same new plan
        on every rank when it pays (launcher.job.rebalancing)."""
        if self.rebalancer.due():
            step = self.sampler.step
            plan = self.rebalancer.decide(self.plan, step, collective_device(self.device))
            if plan is not None:
                self.replan(plan)

    def close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def _loaded(self) -> StepBatches:
        """The current step's micro-batches from the DataLoader (the plan sampler's, or for
        variable-length data this rank's share of the step packed by tokens)."""
        if self._data is None:
            self._data = StepLoader(
                self.task,
                self.sampler,
                self.plan,
                self.ctx.rank,
                num_workers=self.data_workers,
                pin_memory=self.device.type == "cuda",
                stop=self.total,
                max_len=self.max_len,
            )
        loaded = next(self._data)
        if loaded.step != self.sampler.step:
            raise LaunchError(
                f"the data loader is at step {loaded.step}, training at {self.sampler.step}"
            )
        return loaded

    def share(self) -> tuple[list, list, dict[int, int] | None]:
        """This rank's micro-batches of the current global batch: their dataset indices, the
        collated batches, and for variable-length data each sample's length."""
        loaded = self._loaded()
        indices = self.faults.trim(loaded.step, loaded.indices)
        # A micro-batch the short_batch fault trimmed is collated again from its trimmed
        # indices (one trimmed to nothing is gone): the batch trained on is the trimmed one.
        batches = [
            batch if list(mine) == got else self.task.batch(mine)
            for mine, got, batch in zip(indices, loaded.indices, loaded.batches)
        ]
        self._indices = indices
        return indices, batches, loaded.lengths

    def step(self, indices: list, batches: list) -> StepResult:
        task, memory = self.task, self.memory
        first = int(indices[-1][0])
        if memory is not None:
            # Enforced from the attempt's third step on: DDP rebuilds its gradient buckets
            # once, with a broadcast inside the first forward after the first synced
            # backward; an out-of-memory raised there on one rank would skip that broadcast
            # and leave the ranks in different collectives.
            world = dist.get_world_size() if dist.is_initialized() else 1
            enforce = self.stats.steps >= 2 or world == 1
            memory.limit_bytes = self.ctx.device.total_bytes if enforce else None
        self.clock.start_step()
        with memory if memory is not None else contextlib.nullcontext():
            return self.acc.step(
                batches,
                self.loss_fn,
                global_items=task.count_items(self.sampler.global_batch()),
                oom_stand_in=lambda: task.batch([first]),
                local_samples=sum(len(idx) for idx in indices),  # measured, summed over ranks
                expected_samples=self.spec.global_batch_size,
            )

    def record(
        self, result: StepResult, seconds: float, indices: list, lengths_of: dict | None
    ) -> RankSnapshot:
        """The step in this rank's metrics; the snapshot to push."""
        stats = self.stats
        compute = self.clock.step_compute(len(result.micro_step_s))
        stats.on_step(
            result, seconds, self.plan, indices, lengths_of, self.memory, self.device, compute
        )
        if not result.refused:
            self.rebalancer.observe(stats.last["compute"], stats.last["predicted_compute"])
        return stats.snapshot(self.rebalancer.history)

    def stop_agreed(self, stop_requested: Callable[[], bool]) -> bool:
        """Rank 0 asks, every rank learns the answer (a one-number broadcast): the ranks stop
        at the same step boundary."""
        flag = stop_requested() if self.ctx.rank == 0 else False
        if not dist.is_initialized():
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def checkpoint_if_due(self) -> None:
        step = self.sampler.step
        if step % self.spec.checkpoint.interval == 0 or step == self.total:
            self.checkpoint()

    def checkpoint(self) -> None:
        """The checkpoint of the current step (once per step): the previous one complete
        first, then this one copied to host memory and (checkpoint.async) written in the
        background. The time the loop waits here is the save's stall (a metric)."""
        step = self.sampler.step
        if self._saved_step == step:
            return
        self._saved_step = step
        t0 = time.perf_counter()
        self.settle_checkpoint()
        if self.audit is not None and self.audit.segmented:
            # Every rank's lines of the steps before this one are stored before the
            # checkpoint can count as complete (steps after it are redone on resume).
            self.audit.flush()
            if dist.is_initialized():
                dist.barrier()
        state = {
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state().to_dict(),
            "plan": self.plan.to_json(),
            "rebalances": self.rebalancer.history,
            "job": self.ctx.job,
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
        }
        self.saving = begin_checkpoint(
            self.ctx.checkpoint_dir,
            step,
            self.wrapping,
            self.model,
            self.optimizer,
            state,
            before_commit=lambda: self.faults.in_save(step),
            background=self.spec.checkpoint.background,
        )
        self.stats.on_checkpoint(time.perf_counter() - t0)

    def settle_checkpoint(self) -> None:
        """The checkpoint in flight, complete: waits for its write; its error (a StorageError
        where storage is missing) raised here, at the next save or the end."""
        saving, self.saving = self.saving, None
        if saving is not None:
            self.last_checkpoint = str(saving.wait())
            self.stats.on_checkpoint_written(saving.write_s)

    def settle_quietly(self, timeout_s: float = SETTLE_S) -> None:
        """Before a crash drill, or with an error in flight: the write in flight finishes
        if it can within `timeout_s` (none of its errors raised); else it never counts."""
        with contextlib.suppress(BaseException):
            if self.saving is not None:
                self.saving.wait(timeout_s)
                self.settle_checkpoint()

    def outcome(self, *, stopped: bool = False) -> RankOutcome:
        params = output = None
        if not stopped:  # stopped for a resize: the model is the last attempt's to give
            full = self.wrapping.full_state(self.model)  # a collective when sharded
            if self.ctx.rank == 0:
                params = {k: v.detach().cpu().clone() for k, v in full.items()}
                if self.task.save is not None and self.ctx.output_dir:
                    plain = self.wrapping.plain_model(self.model, full, self.task.build_model)
                    _save_output(self.task.save, plain, self.ctx.output_dir)
                    output = self.ctx.output_dir
        return RankOutcome(
            self.ctx.rank,
            self.sampler.step,
            self.plan.to_json(),
            self.stats.oom_events,
            self.last_checkpoint,
            params,
            output,
            stopped=stopped,
        )


def _save_output(
    save: Callable[[torch.nn.Module, str], None], model: torch.nn.Module, to: str
) -> None:
    """The task's trained model or adapter saved to `to`: a local folder, or an object
    store's URI (saved to a local temporary folder, then uploaded)."""
    if not storage.is_uri(to):
        save(model, to)
        return
    with tempfile.TemporaryDirectory(prefix="autobatch-output-") as tmp:
        save(model, tmp)
        storage.Storage(to).upload(tmp)


def _ranks_that(flag: bool) -> list[int]:
    """Every rank learns which ranks raised the flag (one small all-gather, OOM path only)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return [0] if flag else []
    flags = torch.zeros(world, dtype=torch.int32)
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return [r for r in range(world) if flags[r]]
