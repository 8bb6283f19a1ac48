"""What the daemon does with one job's runner events: record, log, export.

plan     -> store.plan, state running, the plan table in the job log
resume   -> the job log (the transition that re-queued the job said why)
restart  -> state restarting (reason), restarts, last_error, the new plan
progress -> snapshots drained from the relay into the daemon's sink (job label =
            job id), store.progress (at most once a second), a log line per step
done     -> a last drain, the summary
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import ray

from autobatch.metrics.snapshot import RankSnapshot
from launcher.job.spec import JobSpec

if TYPE_CHECKING:
    from launcher.daemon.daemon import Daemon


class JobWatcher:
    def __init__(self, daemon: Daemon, job_id: str, spec: JobSpec) -> None:
        self.daemon, self.job_id, self.spec = daemon, job_id, spec
        self.store = daemon.store
        self.relay: Any = None
        self.last_step = -1
        self.last_write = 0.0

    def __call__(self, event: str, details: dict) -> None:
        handler = getattr(self, f"on_{event}", None)
        if handler is not None:
            handler(details)

    def _state(self, state: str, reason: str) -> None:
        if self.store.get(self.job_id).state != state:
            self.store.set_state(self.job_id, state, reason)

    def on_plan(self, details: dict) -> None:
        plan = details["plan"]
        self.store.update(self.job_id, plan=plan.to_dict())
        self.daemon.log(self.job_id, "plan:\n" + plan.render_table())
        self._state(
            "running",
            f"plan of {plan.world_size} rank(s), predicted "
            f"{plan.predicted_samples_per_s:,.1f} samples/s",
        )

    def on_metrics(self, details: dict) -> None:
        self.daemon.log(self.job_id, f"ranks report metrics to {details['url'] or 'the daemon'}")

    def on_resume(self, details: dict) -> None:
        self.daemon.log(self.job_id, f"resuming from {details['checkpoint']}")

    def on_restart(self, details: dict) -> None:
        reason = f"restart {details['restarts']} ({details['kind']}): {details['reason']}"
        self.store.update(
            self.job_id,
            restarts=details["restarts"],
            last_error=details["reason"],
            plan=details["plan"].to_dict(),
        )
        self.daemon.log(self.job_id, reason + f"; resuming from {details['resume']}")
        self._state("restarting", reason)

    def on_progress(self, details: dict) -> None:
        self._drain()
        snaps: list[RankSnapshot] = details["snapshots"]
        rank0 = next((s for s in snaps if s.rank == 0), None)
        if rank0 is None:
            return
        if self.store.get(self.job_id).state == "restarting":
            self._state("running", "training again after the restart")
        step = rank0.optimizer_steps_total
        if step != self.last_step:
            self.last_step = step
            loss = f"{rank0.train_loss:.4f}" if rank0.train_loss is not None else "-"
            self.daemon.log(
                self.job_id,
                f"step {step}/{self.spec.max_steps or '?'} loss {loss} global batch "
                f"{rank0.effective_global_batch_size}/{rank0.global_batch_size}",
            )
        now = time.monotonic()
        if now - self.last_write >= 1.0:
            self.last_write = now
            self.store.update(self.job_id, progress=_progress(snaps, self.spec))

    def on_done(self, details: dict) -> None:
        from launcher.job.runner import summary_dict

        self._drain()
        summary = details["summary"]
        progress = {"step": summary.steps, "total_steps": summary.steps, "ranks": []}
        self.store.update(self.job_id, summary=summary_dict(summary), progress=progress)

    def make_relay(self) -> Any:
        """The runner's collector factory: the relay this watcher drains."""
        from launcher.daemon.daemon import SnapshotRelay
        from launcher.job.cluster import on_this_node

        self.relay = SnapshotRelay.options(**on_this_node()).remote(self.daemon.metrics_url)
        return self.relay

    def _drain(self) -> None:
        if self.relay is None:
            return
        for snap in ray.get(self.relay.drain.remote()):
            self.daemon.sink.push(dataclasses.replace(snap, job=self.job_id))


def _progress(snaps: list[RankSnapshot], spec: JobSpec) -> dict[str, Any]:
    """The job's progress as the API shows it: step, loss, batch, and a line per rank."""
    rank0 = next(s for s in snaps if s.rank == 0)
    return {
        "step": rank0.optimizer_steps_total,
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
