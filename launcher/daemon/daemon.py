"""The launcher daemon: a queue of jobs in SQLite, each run by a JobRunner in its own thread.

    submit -> queued -> (scheduler: all its devices free) -> thread: JobRunner.run()
        listener events -> store (state, plan, progress, restarts), job log, metrics sink

One Ray connection for the process (embedded local Ray, or `address`); every
job's ranks push snapshots to a small collector actor, which the job's thread drains
into the daemon's `PrometheusSink` (so the histogram sees every step), labelled
with the job id. A finished job's ranks are dropped from the sink.

Never losing a job: every transition is in SQLite before anything acts on it.
A daemon that dies (SIGKILL) leaves its running jobs in probing/running/
restarting; the next start moves them back to `queued` with the reason, and the
runner resumes them from their last checkpoint. An embedded Ray dies with the
daemon (Ray ties the raylet and GCS to the driver's life), so its actors free the
devices; on an external cluster Ray kills a dead driver's actors and placement
groups. A graceful stop (SIGTERM) re-queues running jobs the same way.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time
import traceback
from typing import Any

import ray
from pydantic import ValidationError

from autobatch.errors import AutobatchError, format_validation_error
from autobatch.metrics.prometheus import PrometheusSink
from launcher.daemon import scheduler
from launcher.daemon.jobwatch import JobWatcher
from launcher.daemon.store import ACTIVE, TERMINAL, JobStore, StoreError, new_job_id
from launcher.job.checkpoint import latest_checkpoint
from launcher.job.spec import JobSpec, SpecError, parse_spec
from launcher.job.tasks import BUILTIN, daemon_refuses


class InvalidSpec(SpecError):
    """A submitted spec is invalid; `errors` holds one {loc, msg} per problem."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message, errors)
        self.errors = errors

    def __str__(self) -> str:
        return str(self.args[0])


class JobStateError(StoreError):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


@dataclasses.dataclass
class _Running:
    thread: threading.Thread
    stop: threading.Event
    slots: frozenset[str]
    cancel_reason: str | None = None


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
        self.metrics_url, self.run_jobs, self.poll_s = metrics_url, run_jobs, poll_s
        self.running: dict[str, _Running] = {}
        self._specs: dict[str, JobSpec] = {}  # parsed specs of queued jobs, by id
        self.total_gpus = 0
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = False
        self._started_ray = False
        self._loop: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        if not self.run_jobs:
            return
        from launcher.job import cluster

        self._started_ray = cluster.connect(self.address, num_cpus=self.num_cpus)
        # Ray builds its serialisation context (importing pydantic.v1) on first use; doing
        # that in two threads at once (a job thread, the API importing FastAPI) raced into
        # KeyError: 'pydantic.v1'. Build it here, before any job thread exists.
        ray.get(ray.put(None))
        self._loop = threading.Thread(target=self._schedule_loop, name="scheduler", daemon=True)
        self._loop.start()

    def recover(self) -> list[str]:
        """Jobs a dead daemon left active go back to the queue, saying what happens next."""
        ids = []
        for rec in self.store.list(ACTIVE):
            ckpt = latest_checkpoint(pathlib.Path(rec.spec["checkpoint"]["dir"]))
            then = (
                f"resuming from checkpoint {ckpt.name}" if ckpt else "no checkpoint yet: restarting"
            )
            why = f"daemon restarted while the job was {rec.state}: {then}"
            self.transition(rec.id, "queued", why)
            ids.append(rec.id)
        return ids

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every job (they go back to the queue, to resume at the next start)."""
        with self._lock:
            self._stopping = True
            for run in self.running.values():
                run.stop.set()
            threads = [r.thread for r in self.running.values()]
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._loop is not None:
            self._loop.join(5)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self.store.close()

    # -- requests ----------------------------------------------------------------
    def validate(self, data: Any) -> JobSpec:
        """The spec as the daemon will run it: checkpoints under the checkpoint root."""
        if not isinstance(data, dict):
            msg = f"a job spec is a mapping of fields, got {type(data).__name__}"
            raise InvalidSpec(msg, [{"loc": [], "msg": msg}])
        try:
            spec = JobSpec.model_validate(data)
        except ValidationError as exc:
            errors = [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"].removeprefix("Value error, ")}
                for e in exc.errors()
            ]
            raise InvalidSpec(f"invalid job spec: {format_validation_error(exc)}", errors) from None
        refused = daemon_refuses(spec.task, self.task_modules)
        if refused:
            self._invalid(["task"], refused)
        entry = BUILTIN.get(spec.task)
        for key in entry.path_args if entry else ():
            self._readable(["task_args", key], str(spec.task_args[key]))
        return spec

    def submit(self, data: Any) -> str:
        """Queue a job: `data` is a spec as sent (validated here) or one `validate` returned."""
        spec = data if isinstance(data, JobSpec) else self.validate(data)
        job_id = new_job_id(spec.name)
        ckpt = self._confined(["checkpoint", "dir"], spec.checkpoint.dir, job_id)
        output = self._confined(["output_dir"], spec.output_dir, f"{job_id}-final")
        effective = spec.model_dump(mode="json")
        effective["checkpoint"]["dir"] = str(ckpt)
        effective["output_dir"] = str(output)
        self.store.add(job_id, spec.name, effective, reason="submitted")
        self.log(job_id, f"submitted; checkpoints in {ckpt}, trained model (if any) to {output}")
        self._wake.set()
        return job_id

    def cancel(self, job_id: str, wait_s: float = 30.0) -> str:
        """Cancel a queued or active job; returns its state after at most `wait_s`."""
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

    def _invalid(self, loc: list[str], msg: str) -> None:
        raise InvalidSpec(f"invalid job spec: {'.'.join(loc)}: {msg}", [{"loc": loc, "msg": msg}])

    def _readable(self, loc: list[str], path: str) -> None:
        """A path a task reads: inside a data root (symlinks resolved), or refused."""
        resolved = pathlib.Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.data_roots):
            roots = ", ".join(str(r) for r in self.data_roots)
            self._invalid(
                loc,
                f"{path!r} is outside the data roots this daemon reads from ({roots}); put it "
                "there, or start the daemon with --data-root DIR",
            )

    def _confined(self, loc: list[str], path: str | None, default: str) -> pathlib.Path:
        """A directory the job writes to: inside the checkpoint root, or refused."""
        if not path:
            return self.checkpoint_root / default
        p = pathlib.Path(path)
        resolved = (p if p.is_absolute() else self.checkpoint_root / p).resolve()
        if not resolved.is_relative_to(self.checkpoint_root) or resolved == self.checkpoint_root:
            self._invalid(
                loc,
                f"{path!r} is outside the checkpoint root {self.checkpoint_root}; "
                "give a relative path inside it",
            )
        return resolved

    # -- scheduling --------------------------------------------------------------
    def _schedule_loop(self) -> None:
        while not self._stopping:
            try:
                self.schedule()
            except Exception:  # noqa: BLE001 - the loop must survive; the reason is logged
                traceback.print_exc()
            self._wake.wait(self.poll_s)
            self._wake.clear()

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
            busy = {s for r in self.running.values() for s in r.slots}
            specs = self._specs = {job_id: spec for job_id, _, spec in queue}  # the rest left
            started = scheduler.pick([(i, n) for i, n, _ in queue], busy, self.total_gpus)
            for job_id, slots in started:
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._run_job,
                    args=(job_id, specs[job_id], stop, slots),
                    name=f"job:{job_id}",
                    daemon=True,
                )
                self.running[job_id] = _Running(thread, stop, slots)
                free = f"all {len(slots)} device(s) free: {', '.join(sorted(slots))}"
                self.transition(job_id, "probing", free)
                thread.start()
        return [job_id for job_id, _ in started]

    def _run_job(self, job_id: str, spec: JobSpec, stop: threading.Event, slots: frozenset) -> None:
        from launcher.job.runner import JobCancelled, JobRunner

        watcher = JobWatcher(self, job_id, spec)
        try:
            runner = JobRunner(
                spec,
                listener=watcher,
                stop=stop,
                collector_factory=watcher.make_collector,
            )
            summary = runner.run()
            done = f"{summary.steps} steps in {summary.seconds:.1f} s"
            self.transition(job_id, "succeeded", done)
        except JobCancelled:
            self._ended(job_id, None)
        except AutobatchError as exc:
            self._ended(job_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not the daemon
            self.log(job_id, traceback.format_exc().rstrip())
            self._ended(job_id, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.sink.drop_job(job_id)
            with self._lock:
                self.running.pop(job_id, None)
            self._wake.set()

    def _ended(self, job_id: str, error: str | None) -> None:
        """A job that did not succeed: cancelled, re-queued (daemon stopping) or failed."""
        with self._lock:
            run = self.running.get(job_id)
            reason = run.cancel_reason if run else None
            if reason:
                self.transition(job_id, "cancelled", reason)
            elif self._stopping:
                why = "daemon stopped: will resume from the last checkpoint"
                self.transition(job_id, "queued", why)
            else:
                self.transition(job_id, "failed", error or "stopped", last_error=error)
