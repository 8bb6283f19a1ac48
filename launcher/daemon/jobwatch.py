"""What the daemon does with one job's controller events: record, log, export.

StateChanged -> the job log ("phase probing: ..."), and the daemon's state for it
                (`launcher.job.states.DAEMON_STATE`, one to one) with the controller's
                reason; the terminal states are the job's outcome's to record (the daemon
                concludes the job from it)
Planned      -> store.plan, the plan table in the job log
MetricsAt    -> the job log
Resuming     -> the job log (the transition that re-queued the job said why)
Restarting   -> restarts, last_error, the new plan, the job log
Resized      -> store.resizes (each with its reason), the job log; the daemon's slots
Rebalanced   -> store.rebalances (step, predicted step before and after, the new split),
                the job log
Progress     -> snapshots drained from the job's collector into the daemon's sink
                (job label = job id), store.progress (at most once a second), a log
                line per step
Finished     -> a last drain, the summary
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Protocol

import ray

from autobatch.metrics.prometheus import PrometheusSink
from autobatch.metrics.snapshot import RankSnapshot
from launcher.daemon.store import JobStore
from launcher.job.events import (
    Finished,
    MetricsAt,
    Planned,
    Progress,
    Rebalanced,
    Resized,
    Restarting,
    Resuming,
    RunnerEvent,
    StateChanged,
    describe_rebalance,
    describe_resize,
)
from launcher.job.spec import JobSpec
from launcher.job.states import DAEMON_STATE

_OUTCOMES = ("succeeded", "failed", "cancelled")


class JobHost(Protocol):
    """What a watcher needs of the daemon."""

    store: JobStore
    sink: PrometheusSink
    metrics_url: str

    def log(self, job_id: str, line: str) -> None: ...

    def transition(self, job_id: str, state: str, reason: str) -> None: ...

    def resized(self, job_id: str, devices: tuple[int, ...]) -> None: ...


class JobWatcher:
    def __init__(self, host: JobHost, job_id: str, spec: JobSpec) -> None:
        self.host, self.job_id, self.spec = host, job_id, spec
        self.store = host.store
        self.collector: Any = None  # the job's SnapshotCollector, once its ranks start
        self.last_step = -1
        self.last_write = 0.0

    def __call__(self, event: RunnerEvent) -> None:
        match event:
            case StateChanged(state=state, reason=reason) if state not in _OUTCOMES:
                self.host.log(self.job_id, f"phase {state}: {reason}")
                self._state(DAEMON_STATE[state], reason)
            case Planned(plan=plan):
                self.store.update(self.job_id, plan=plan.to_dict())
                self.host.log(self.job_id, "plan:\n" + plan.render_table())
            case MetricsAt(url=url):
                self.host.log(self.job_id, f"ranks report metrics to {url or 'the daemon'}")
            case Resuming(checkpoint=checkpoint):
                self.host.log(self.job_id, f"resuming from {checkpoint}")
            case Restarting(decision=decision, restarts=restarts, resume=resume):
                reason = f"restart {restarts}: {decision.reason}"
                self.store.update(
                    self.job_id,
                    restarts=restarts,
                    last_error=decision.reason,
                    plan=decision.plan.to_dict(),
                )
                self.host.log(self.job_id, f"{reason}; resuming from {resume}")
            case Resized() as r:
                self._resized(r)
            case Rebalanced() as r:
                self._rebalanced(r)
            case Progress(snapshots=snapshots):
                self._progress(snapshots)
            case Finished(summary=summary):
                self._drain()
                progress = {"step": summary.steps, "total_steps": summary.steps, "ranks": []}
                self.store.update(self.job_id, summary=summary.to_dict(), progress=progress)

    def _resized(self, r: Resized) -> None:
        entry = {
            "at": time.time(), "reason": r.reason, "why": r.why, "devices": list(r.devices),
            "before": list(r.before), "step": r.step, "seconds": round(r.seconds, 3),
        }  # fmt: skip
        resizes = self.store.get(self.job_id).resizes or []
        self.store.update(self.job_id, resizes=[*resizes, entry])
        self.host.log(self.job_id, f"resized: {describe_resize(r)}")
        self.host.resized(self.job_id, r.devices)

    def _rebalanced(self, r: Rebalanced) -> None:
        """A rebalance in the record and the log, once: a re-queued job's new run resumes
        from a checkpoint that carries the rebalances before it, and reports them again."""
        rebalances = self.store.get(self.job_id).rebalances or []
        split = [list(mb) for mb in r.micro_batches]
        if any(e["step"] == r.step and e["micro_batches"] == split for e in rebalances):
            return
        entry = {"at": time.time(), **r.to_dict()}
        self.store.update(self.job_id, rebalances=[*rebalances, entry])
        self.host.log(self.job_id, describe_rebalance(r))

    def _state(self, state: str, reason: str) -> None:
        if self.store.get(self.job_id).state != state:
            self.host.transition(self.job_id, state, reason)

    def _progress(self, snaps: Sequence[RankSnapshot]) -> None:
        self._drain()
        rank0 = next((s for s in snaps if s.rank == 0), None)
        if rank0 is None:
            return
        step = rank0.step
        if step != self.last_step:
            self.last_step = step
            loss = f"{rank0.train_loss:.4f}" if rank0.train_loss is not None else "-"
            self.host.log(
                self.job_id,
                f"step {step}/{self.spec.max_steps or '?'} loss {loss} global batch "
                f"{rank0.effective_global_batch_size}/{rank0.global_batch_size}",
            )
        now = time.monotonic()
        if now - self.last_write >= 1.0:
            self.last_write = now
            self.store.update(self.job_id, progress=_progress(snaps, self.spec))

    def _drain(self) -> None:
        if self.collector is None:
            return
        for snap in ray.get(self.collector.drain.remote()):
            self.host.sink.push(dataclasses.replace(snap, job=self.job_id))


def _progress(snaps: Sequence[RankSnapshot], spec: JobSpec) -> dict[str, Any]:
    """The job's progress as the API shows it: step, loss, batch, and a line per rank."""
    rank0 = next(s for s in snaps if s.rank == 0)
    return {
        "step": rank0.step,
        "total_steps": spec.max_steps,
        "train_loss": rank0.train_loss,
        "global_batch_size": rank0.global_batch_size,
        "effective_global_batch_size": rank0.effective_global_batch_size,
        "ranks": [
            {
                "rank": s.rank,
                "device": s.device,
                "micro_batch_size": s.micro_batch_size,
                "accumulation_steps": s.accumulation_steps,
                "torch_memory_peak_bytes": s.torch_memory_peak_bytes,
                "plan_predicted_peak_bytes": s.plan_predicted_peak_bytes,
                "oom_events": s.oom_events_total,
            }
            for s in sorted(snaps, key=lambda s: s.rank)
        ],
    }
