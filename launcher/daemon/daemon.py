"""The launcher daemon: a queue of jobs in SQLite, each driven by a supervisor that outlives it.

    submit -> queued -> (scheduler: its devices free) -> supervisor actor: JobController.run()
        a thread per job: poll the supervisor -> events -> store, job log, metrics sink
    scheduler: elastic jobs grow into freed devices and shrink for the head of the queue

Ray is not the daemon's process: by default a head of its own per state directory
(`rayhead`), or the cluster at `address`, reached through `raylink`. The API answers
before Ray is connected (`link.waiting_for` says what it waits for). A lost head or
cluster ends the daemon's process (`on_ray_lost`): the process serving `autobatch
serve` is replaced by its keeper (launcher.daemon.keeper), and the new one starts a new
head (or waits for the cluster) and re-queues what ran there. Each job's driver is a detached
actor (`supervisor`), so a daemon that stops or dies costs its jobs nothing: the next
start re-attaches to them by job id. Every transition is in SQLite before anything acts
on it; a job whose supervisor died goes back to the queue, saying why, and resumes from
its last checkpoint. The ranks' snapshots are drained into one `PrometheusSink`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from autobatch.metrics.prometheus import PrometheusSink
from launcher.daemon import scheduler, supervisor
from launcher.daemon.admission import Admission
from launcher.daemon.jobwatch import JobWatcher
from launcher.daemon.raylink import RayLink
from launcher.daemon.store import ACTIVE, TERMINAL, JobStore, new_job_id
from launcher.errors import JobStateError
from launcher.job.checkpoint import checkpoint_name, latest_checkpoint
from launcher.job.spec import JobSpec, parse_spec
from launcher.job.storage import check_storage


@dataclasses.dataclass
class _Running:
    thread: threading.Thread
    stop: threading.Event
    need: scheduler.Need
    slots: frozenset[str]  # held: what it runs on, and what it grows into
    cancel_reason: str | None = None
    sup: Any = None  # its supervisor, once launched
    resizing: bool = False  # a resize asked for, not done yet
    releasing: frozenset[str] = frozenset()  # slots a shrink under way gives back

    def view(self, job_id: str) -> scheduler.Running:
        # A job without a supervisor yet cannot be resized: it counts as resizing.
        busy = self.resizing or self.sup is None
        return scheduler.Running(job_id, self.need, self.slots, busy, self.releasing)


class Daemon:
    def __init__(
        self,
        state_dir: str | pathlib.Path,
        *,
        address: str | None = None,
        num_cpus: int = 16,
        checkpoint_root: str | pathlib.Path | None = None,
        task_modules: tuple[str, ...] = (),
        data_roots: tuple[str | pathlib.Path, ...] = (),
        metrics_url: str = "",
        run_jobs: bool = True,
        poll_s: float = 0.5,
    ) -> None:
        self.state_dir = pathlib.Path(state_dir).resolve()
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_root = pathlib.Path(
            checkpoint_root or self.state_dir / "checkpoints"
        ).resolve()
        self.store = JobStore(self.state_dir / "jobs.db")
        self.sink = PrometheusSink()
        self.sink.set_job_states(self.store.counts)
        self.address, self.num_cpus, self.task_modules = address, num_cpus, task_modules
        # Directories a task may read from (a model, a data file); default: where it started.
        self.data_roots = tuple(pathlib.Path(r).resolve() for r in data_roots or (".",))
        self.admission = Admission(
            checkpoint_root=self.checkpoint_root,
            data_roots=self.data_roots,
            task_modules=task_modules,
        )
        self.metrics_url, self.run_jobs, self.poll_s = metrics_url, run_jobs, poll_s
        self.running: dict[str, _Running] = {}
        self._specs: dict[str, JobSpec] = {}  # parsed specs of queued jobs, by id
        self.total_gpus = 0
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = False
        self._lost = False  # Ray was lost: nothing more is done through it in this process
        self._ready = threading.Event()  # Ray connected, the last run's jobs recovered
        self._loop: threading.Thread | None = None
        self.link = RayLink(self.state_dir, address, num_cpus)
        # Called (from the Ray watch or a job thread) once Ray is lost; `autobatch serve`
        # ends the process there, for a new one. None: the daemon stops following its jobs.
        self.on_ray_lost: Callable[[], None] | None = None

    # -- life cycle --------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduling thread: it connects to the daemon's Ray (starting its head
        if needed, retrying while it cannot), re-attaches to the jobs that kept running,
        then schedules. Returns at once: requests are answered meanwhile."""
        if not self.run_jobs:
            self.recover()
            self._ready.set()
            return
        self.link.waiting_for = "the Ray head: connecting"
        self._loop = threading.Thread(target=self._schedule_loop, name="scheduler", daemon=True)
        self._loop.start()

    def recover(self) -> list[str]:
        """Jobs the last daemon left active: re-attached when their supervisor still runs
        (nothing lost), else back to the queue to resume from their last checkpoint.
        Returns the ids re-queued."""
        ids = []
        for rec in self.store.list(ACTIVE):
            sup = supervisor.find(rec.id) if self.run_jobs else None
            if sup is not None:
                self._attach(rec.id, parse_spec(rec.spec), sup)
                continue
            if self.link.lost:  # the head the job ran on is gone
                cause = f"{self.link.lost} while the job was {rec.state}"
            else:
                gone = " and its supervisor is gone" if self.run_jobs else ""
                cause = f"daemon restarted while the job was {rec.state}{gone}"
            self.requeue(rec, cause)
            ids.append(rec.id)
        return ids

    def requeue(self, rec: Any, cause: str) -> None:
        """Back to the queue, saying why and where it will resume."""
        why, restarts = f"{cause}: {self._resume(rec)}", rec.restarts + 1
        self.transition(rec.id, "queued", why, restarts=restarts)

    def shutdown(self, timeout_s: float = 30.0, *, lost: bool = False) -> None:
        """Stop following the jobs and disconnect; they keep running on their supervisors
        (the next start re-attaches; `autobatch serve --shutdown` stops them). `lost`: Ray
        was lost, so nothing waits on it (a job thread may be stuck in a Ray call, and any
        Ray call, ray.shutdown() included, may end the process)."""
        with self._lock:
            self._stopping = True
            for run in self.running.values():
                run.stop.set()
            threads = [r.thread for r in self.running.values()]
        self._wake.set()
        if not lost:
            deadline = time.monotonic() + timeout_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            if self._loop is not None:
                self._loop.join(5)
            if ray.is_initialized():
                ray.shutdown()  # a driver's disconnect: the daemon never owns the cluster
            self.store.close()
        # Lost: the store stays open (a thread stuck in a Ray call may hold the lock); every
        # transition is committed, and the process ends without Ray's exit hooks.

    # -- requests ----------------------------------------------------------------
    def validate(self, data: Any) -> JobSpec:
        """The spec as the daemon will run it (launcher.daemon.admission)."""
        return self.admission.validate(data)

    def submit(self, data: Any) -> str:
        """Queue a job: `data` is a spec as sent (validated here) or one `validate` returned."""
        spec = data if isinstance(data, JobSpec) else self.validate(data)
        job_id = new_job_id(spec.name)
        ckpt = self.admission.confined(["checkpoint", "dir"], spec.checkpoint.dir, job_id)
        output = self.admission.confined(["output_dir"], spec.output_dir, f"{job_id}-final")
        check_storage(ckpt, output)  # writable, before anything is queued or reserved
        effective = spec.model_dump(mode="json")
        effective["checkpoint"]["dir"] = str(ckpt)
        effective["output_dir"] = str(output)
        self.store.add(job_id, spec.name, effective, reason="submitted")
        self.log(job_id, f"submitted; checkpoints in {ckpt}, trained model (if any) to {output}")
        self._wake.set()
        return job_id

    def cancel(self, job_id: str, wait_s: float = 30.0) -> str:
        """Cancel a queued or active job; returns its state after at most `wait_s`."""
        if not self._ready.wait(wait_s):  # not yet re-attached: an active job has no thread
            rec = self.store.get(job_id)
            if rec.state in ACTIVE:
                raise JobStateError(
                    f"job {job_id} is {rec.state} and the daemon is waiting for "
                    f"{self.link.waiting_for}; cancel it again once /healthz says ok"
                )
        with self._lock:
            rec = self.store.get(job_id)
            if rec.state in TERMINAL:
                raise JobStateError(f"job {job_id} is already {rec.state}; nothing to cancel")
            run = self.running.get(job_id)
            if run is None:
                self.transition(job_id, "cancelled", "cancelled by request while queued")
                return "cancelled"
            run.cancel_reason = f"cancelled by request while {rec.state}"
            run.stop.set()
        self.log(job_id, "cancel requested: stopping the job's actors")
        run.thread.join(wait_s)
        return self.store.get(job_id).state

    def transition(self, job_id: str, state: str, reason: str, **data: Any) -> None:
        """The one way a job changes state: the store checks and records the transition (and
        `data`, e.g. last_error, in the same breath), the job log says it."""
        with self._lock:
            self.store.set_state(job_id, state, reason)
            if data:
                self.store.update(job_id, **data)
        self.log(job_id, f"{state}: {reason}")

    def log(self, job_id: str, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with self._lock, (self.logs_dir / f"{job_id}.log").open("a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")

    def log_path(self, job_id: str) -> pathlib.Path:
        self.store.get(job_id)  # unknown id: UnknownJob
        return self.logs_dir / f"{job_id}.log"

    # -- helpers -----------------------------------------------------------------
    def _parsed(self, job_id: str, spec: dict[str, Any]) -> JobSpec:
        """A queued job's spec, parsed once (the scheduler looks at the queue twice a
        second; re-validating a thousand specs each time would starve the API)."""
        parsed = self._specs.get(job_id)
        if parsed is None:
            parsed = self._specs[job_id] = parse_spec(spec)
        return parsed

    # -- scheduling --------------------------------------------------------------
    def _schedule_loop(self) -> None:
        if not self.link.connect_until(lambda: self._stopping, self._wake):
            return
        threading.Thread(target=self._watch_ray, name="ray-watch", daemon=True).start()
        try:
            self.total_gpus = int(ray.cluster_resources().get("GPU", 0))
            self.recover()
        except Exception:  # noqa: BLE001 - a Ray that fails here is not to be trusted
            traceback.print_exc()
            self._ray_lost("the Ray connection failed while re-attaching to the jobs")
            return
        self._ready.set()
        while not self._stopping and not self._lost:
            try:
                self.schedule()
            except Exception:  # noqa: BLE001 - the loop must survive; the reason is logged
                traceback.print_exc()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _watch_ray(self) -> None:
        """Notice a lost head in a thread that never calls Ray: with the GCS gone, a Ray call
        (the scheduler's ray.cluster_resources()) can wait for ever."""
        while not self._stopping and not self._lost:
            if not self.link.healthy():
                self._ray_lost(self.link.lost_what())
                return
            time.sleep(self.poll_s)

    def _ray_lost(self, what: str) -> None:
        """Ray (the head, or the cluster) is gone: nothing more is done through it in this
        process. A driver that lost its raylet exits its process from inside Ray at the next
        call that notices, so the daemon does not reconnect here: it stops following its
        jobs and hands over to `on_ray_lost` (`autobatch serve`: a new daemon process
        starts a new head, or waits for the cluster, and re-queues what ran there)."""
        with self._lock:
            if self._lost:
                return
            self._lost = True
            for run in self.running.values():
                run.stop.set()
        self.link.waiting_for = f"a new daemon process: {what}"
        print(f"autobatch daemon: {what}; leaving for a new daemon process", file=sys.stderr)
        if self.on_ray_lost is not None:
            self.on_ray_lost()

    def schedule(self) -> list[str]:
        """Start every queued job whose devices are all free; fail the ones that never fit."""
        self.total_gpus = int(ray.cluster_resources().get("GPU", 0))
        with self._lock:
            if self._stopping:
                return []
            queue = []
            for rec in self.store.list(("queued",)):
                spec = self._parsed(rec.id, rec.spec)
                need = scheduler.need(spec)
                why = scheduler.unsatisfiable(need, self.total_gpus)
                if why:
                    self.transition(rec.id, "failed", why, last_error=why)
                    continue
                queue.append((rec.id, need, spec))
            specs = self._specs = {job_id: spec for job_id, _, spec in queue}  # the rest left
            needs = {job_id: need for job_id, need, _ in queue}
            moves = scheduler.schedule(
                [(i, n) for i, n, _ in queue],
                [run.view(job_id) for job_id, run in self.running.items()],
                self.total_gpus,
            )
            for job_id, slots in moves.starts:
                n = needs[job_id]
                some = "all" if len(slots) == n.wanted(self.total_gpus) else "elastic:"
                free = f"{some} {len(slots)} device(s) free: {', '.join(sorted(slots))}"
                self.transition(job_id, "probing", free)
                self._follow_in_thread(job_id, specs[job_id], n, slots, None)
            for resize in moves.resizes:
                self._resize(resize)
        return [job_id for job_id, _ in moves.starts]

    def _resize(self, resize: scheduler.Resize) -> None:
        """Ask a running elastic job's supervisor to move to `resize.slots`. Slots it grows
        into are its own at once; slots it gives back are free once it says it resized."""
        run = self.running[resize.job_id]
        devices = run.need.devices(resize.slots)
        before = run.slots
        if resize.reason == "grew":
            run.slots = resize.slots
        else:
            run.releasing = run.slots - resize.slots
        run.resizing = True
        self.log(resize.job_id, f"resizing to devices {devices}: {resize.why}")
        try:
            ray.get(run.sup.resize.remote(devices, resize.reason, resize.why), timeout=10)
        except (RayActorError, GetTimeoutError, ray.exceptions.RayTaskError) as exc:
            self.log(resize.job_id, f"resize not asked for: {type(exc).__name__}: {exc}")
            run.slots, run.resizing, run.releasing = before, False, frozenset()

    def resized(self, job_id: str, devices: tuple[int, ...]) -> None:
        """The job runs on `devices` now (a resize done, or devices lost)."""
        with self._lock:
            run = self.running.get(job_id)
            if run is not None:
                run.slots = run.need.slots_of(devices, run.slots)
                run.resizing, run.releasing = False, frozenset()
        self._wake.set()

    def _attach(self, job_id: str, spec: JobSpec, sup: Any) -> None:
        """Follow a job a previous daemon started, on the devices it holds."""
        need = scheduler.need(spec)
        try:  # an elastic job may hold a subset of its devices
            devices = ray.get(sup.devices.remote(), timeout=30)
        except (AttributeError, RayActorError, GetTimeoutError):
            devices = None  # a supervisor of a daemon from before elastic jobs: all of them
        with self._lock:
            busy = {s for r in self.running.values() for s in r.slots}
            devices = devices or range(need.wanted(self.total_gpus))
            free = frozenset(scheduler.free_slots(need, busy, self.total_gpus))
            slots = need.slots_of(devices, free)  # GPUs: as many of the free ones
            self.log(job_id, "daemon restarted: re-attached to the job's supervisor, which "
                     "kept it running")  # fmt: skip
            self._follow_in_thread(job_id, spec, need, slots, sup)

    def _follow_in_thread(
        self, job_id: str, spec: JobSpec, need: scheduler.Need, slots: frozenset[str], sup: Any
    ) -> None:
        stop = threading.Event()
        thread = threading.Thread(
            target=self._run_job, args=(job_id, spec, stop, sup), name=f"job:{job_id}", daemon=True
        )
        self.running[job_id] = _Running(thread, stop, need, slots, sup=sup)
        thread.start()

    def _run_job(self, job_id: str, spec: JobSpec, stop: threading.Event, sup: Any) -> None:
        """Launch (or re-attach to) the job's supervisor and follow it to its end."""
        outcome: dict[str, Any] | None = None
        try:
            if sup is None:
                with self._lock:
                    run = self.running[job_id]
                    devices = run.need.devices(run.slots) if spec.devices.elastic else None
                before = self.store.get(job_id).restarts  # re-queues count as restarts
                sup = supervisor.launch(job_id, spec, self.metrics_url, devices, before)
                with self._lock:
                    run.sup = sup
            outcome = self._follow(job_id, sup, JobWatcher(self, job_id, spec), stop)
        except (RayActorError, GetTimeoutError) as exc:
            outcome = {"state": "lost", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not the daemon
            self.log(job_id, traceback.format_exc().rstrip())
            outcome = {"state": "failed", "error": f"internal error: {type(exc).__name__}: {exc}"}
        finally:
            if outcome is not None and outcome["state"] != "succeeded" and self._ray_gone():
                outcome = None  # lost with Ray: the next daemon process re-queues it
            if outcome is not None:  # None: the daemon stops, or lost Ray; the job runs on
                self._conclude(job_id, outcome)
                if not self._ray_gone():  # else it died with the head (and ray.kill would wait)
                    supervisor.reap(sup)
                self.sink.drop_job(job_id)
            with self._lock:
                self.running.pop(job_id, None)
            self._wake.set()

    def _follow(
        self, job_id: str, sup: Any, watcher: JobWatcher, stop: threading.Event
    ) -> dict[str, Any] | None:
        """Hand the supervisor's events to the watcher until the run ends (its outcome), or
        the daemon stops (None: the job keeps running). A cancel is passed on."""
        ack, cancelling = -1, False
        while True:
            if stop.is_set() and not cancelling:
                if self.running[job_id].cancel_reason is None:
                    return None  # the daemon is stopping
                sup.cancel.remote()
                cancelling = True
            events, outcome, watcher.collector = ray.get(sup.poll.remote(ack), timeout=60)
            for seq, event in events:
                watcher(event)
                ack = seq
            if outcome is not None:
                return outcome
            time.sleep(0.1) if cancelling else stop.wait(0.5)

    def _conclude(self, job_id: str, outcome: dict[str, Any]) -> None:
        if "traceback" in outcome:
            self.log(job_id, outcome["traceback"].rstrip())
        with self._lock:
            run = self.running.get(job_id)
            match outcome["state"]:
                case "succeeded":
                    self.transition(job_id, "succeeded", outcome["reason"], last_error=None)
                case "cancelled":
                    reason = run.cancel_reason if run and run.cancel_reason else "cancelled"
                    self.transition(job_id, "cancelled", reason)
                case "lost" if not self._stopping:
                    rec = self.store.get(job_id)
                    why = f"the job's supervisor died ({outcome['error']}): {self._resume(rec)}"
                    restarts = rec.restarts + 1
                    self.transition(job_id, "queued", why, last_error=why, restarts=restarts)
                case "lost":
                    pass  # the daemon stops: the next start finds out what became of it
                case _:
                    self.transition(job_id, "failed", outcome["error"], last_error=outcome["error"])

    def _ray_gone(self) -> bool:
        """Whether this process lost Ray; a job thread asks when a Ray call failed: if the
        head's process is gone too, the job's end is not this process's to judge (a new
        process re-queues it), and this one leaves for it at once. A head that is only
        slow to answer is the watch thread's to judge (`RayLink.healthy`)."""
        if self._lost:
            return True
        if not self.link.head_gone():
            return False
        self._ray_lost(self.link.lost_what())
        return True

    @staticmethod
    def _resume(rec: Any) -> str:
        ckpt = latest_checkpoint(rec.spec["checkpoint"]["dir"])  # a path or a URI
        return (
            f"resuming from checkpoint {checkpoint_name(ckpt)}"
            if ckpt
            else "no checkpoint yet: restarting"
        )
